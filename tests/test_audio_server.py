"""``POST /v1/audio/transcriptions`` and ``qkv transcribe`` through the official ``openai``
client and the CLI. This qkv's LLM has no ``transcribe`` yet: the endpoint and the command
say so by name (501 / exit 2). The wiring is exercised end to end by giving the served LLM a
``transcribe`` that runs a tiny random HF Whisper (a real reference decoder, not a stub)."""

from __future__ import annotations

import io

import numpy as np
import pytest

openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile", reason="needs qkv[audio]")
pytest.importorskip("multipart", reason="needs python-multipart (qkv[serve])")

from test_server import Server, _err, make_model_dir  # noqa: E402


def _wav(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(16_000 * seconds)) / 16_000
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from qkv import LLM
    from qkv.server import create_app

    llm = LLM(make_model_dir(tmp_path_factory.mktemp("tiny")), device="cpu", num_kv_blocks=32)
    s = Server(create_app(llm, "tiny"))
    yield s, llm
    s.stop()
    assert llm.stats()["num_blocks_in_use"] == 0


def test_without_whisper_support_the_endpoint_says_so(served):
    server, _ = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="tiny", file=("talk.wav", _wav()))
    assert e.value.status_code == 501 and "Whisper model support is not merged yet" in str(e.value)


def test_bad_uploads_are_refused_by_name(served):
    import httpx

    url = served[0].url + "/v1/audio/transcriptions"
    good = {"file": ("talk.wav", _wav())}
    err = _err(httpx.post(url, files={"file": ("talk.wav", b"RIFF....WAVEjunk")}, data={"model": "tiny"}), 400, "invalid_audio",
               "talk.wav: not a readable audio file")
    assert err["param"] == "file"
    _err(httpx.post(url, files=good, data={"response_format": "srt"}), 400, "unsupported_parameter", "'srt'")
    _err(httpx.post(url, files=good, data={"prompt": "hi"}), 400, "unsupported_parameter", "prompt")
    _err(httpx.post(url, files=good, data={"temperature": "0.7"}), 400, "unsupported_parameter", "temperature")
    _err(httpx.post(url, files=good, data={"model": "whisper-large"}), 404, "model_not_found")
    _err(httpx.post(url, data={"model": "tiny"}, files={"other": ("x", b"1")}), 400, "unsupported_parameter")
    _err(httpx.post(url, json={"model": "tiny"}), 400, "invalid_value", "multipart")


def test_openai_client_gets_json_text_and_verbose_json(served):
    from whisper_ref import tiny_speech_model, whisper_tokenizer_file

    from qkv.audio.transcribe import transcribe

    server, llm = served
    model = tiny_speech_model(whisper_tokenizer_file())
    audio = _wav(2.0)
    expected = transcribe(model, audio, language="en", response_format="verbose_json")
    llm.transcribe = lambda samples, **kw: transcribe(model, samples, **kw)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        got = client.audio.transcriptions.create(model="tiny", file=("a.wav", audio), language="en")
        assert got.text == expected["text"]
        text = client.audio.transcriptions.create(model="tiny", file=("a.wav", audio), language="en", response_format="text")
        assert text == expected["text"]
        verbose = client.audio.transcriptions.create(model="tiny", file=("a.wav", audio), language="en",
                                                     response_format="verbose_json")
        assert verbose.language == "english" and verbose.duration == 2.0
        assert [s.tokens for s in verbose.segments] == [s["tokens"] for s in expected["segments"]]
        with pytest.raises(openai.BadRequestError, match="language: unknown language"):
            client.audio.transcriptions.create(model="tiny", file=("a.wav", audio), language="xx")
    finally:
        del llm.transcribe


def test_cli_refuses_malformed_audio_and_missing_support(tmp_path, capsys):
    from qkv import cli

    bad = tmp_path / "talk.wav"
    bad.write_bytes(b"\0" * 64)
    assert cli.main(["transcribe", str(bad)]) == 2
    assert "talk.wav: not a readable audio file" in capsys.readouterr().err
    good = tmp_path / "tone.wav"
    good.write_bytes(_wav())
    assert cli.main(["transcribe", str(good), "--response-format", "json"]) == 2
    assert "Whisper model support is not merged yet" in capsys.readouterr().err
