"""SampleText (engine/detokenizer.py) against the engine's own text and stop
strings: fed the tokens the offline engine generated, it must end where the engine ends, with
the same text, and what it streams must add up to that text without ever showing a piece of
the stop string that was cut."""

from __future__ import annotations

import pytest

from test_server import make_model_dir


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from qkv import LLM

    return LLM(make_model_dir(tmp_path_factory.mktemp("tiny-detok")), device="cpu", num_kv_blocks=64)


def replay(llm, tokens, params):
    from qkv.engine.detokenizer import SampleText

    s = SampleText(llm.tokenizer, params, frozenset(llm.engine.eos_ids))
    streamed = ""
    for i, t in enumerate(tokens):
        delta, stopped = s.push(t)
        streamed += delta
        if stopped:
            return s.text, streamed, i + 1, "stop"
    return s.text, streamed + s.flush(), len(tokens), None


def test_sample_text_stops_where_the_engine_stops(llm):
    from qkv import SamplingParams

    prompt = "count: one two"
    free = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = free.text
    stops = list(dict.fromkeys(text[a:a + n] for a in (0, 2, 5, 9, 14) for n in (1, 2, 4) if text[a:a + n]))
    cases = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, min_tokens=m, stop=[stop, "\x00never"],
                            include_stop_str_in_output=inc)
             for stop in stops for inc in (False, True) for m in (0, 6)]
    wants = llm.generate([prompt] * len(cases), cases)  # one batch: the engine's answers
    assert any(w.finish_reason == "stop" for w in wants)
    for params, want in zip(cases, wants):
        got, streamed, used, reason = replay(llm, free.token_ids, params)
        assert (got, used) == (want.text, len(want.token_ids)), params
        assert reason == (want.finish_reason if want.finish_reason == "stop" else None)
        assert streamed == got  # deltas add up to the text; nothing of a cut stop string leaked


def test_eos_and_stop_ids_add_no_text(llm):
    from qkv import SamplingParams

    free = llm.generate(["hello world"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[free.token_ids[3]])
    want = llm.generate(["hello world"], params)[0]
    got, _, _, _ = replay(llm, want.token_ids, params)
    assert got == want.text
