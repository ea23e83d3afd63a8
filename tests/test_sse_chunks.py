"""The streamed chunk written around a template (server/app.py ``SSEChunks.text``) is, byte for
byte, the chunk ``SSEChunks.event`` writes from the choice dict: any text (quotes, backslashes,
control characters, non-ASCII), any finish reason, chat and completions, any id and model name."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")

from qkv.server import protocol as P  # noqa: E402
from qkv.server.app import SSEChunks  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(text=st.text(), reason=st.sampled_from([None, "stop", "length", "abort", "error"]), chat=st.booleans(),
       index=st.integers(0, 300), rid=st.text(min_size=1), model=st.text(min_size=1),
       later=st.integers(0, 2))
def test_text_chunk_is_the_event_chunk(text, reason, chat, index, rid, model, later):
    with mock.patch("time.time", return_value=1_700_000_000.5):
        chunks = SSEChunks(rid, model, chat)
    with mock.patch("time.time", return_value=1_700_000_000.5 + later):  # "created" moves with the clock
        want = chunks.event([P.choice(index, text, reason, chat, True)])
        assert chunks.text(index, text, reason) == want
