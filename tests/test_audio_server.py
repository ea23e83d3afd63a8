"""``POST /v1/audio/transcriptions`` (through the official ``openai`` client) and ``qkv transcribe``
on qkv's own Whisper: a tiny random ``WhisperForConditionalGeneration`` saved with
``save_pretrained`` beside the real Whisper tokenizer. The reference is HF transformers' greedy
decoding of the same model (tests/whisper_ref.py) driven by the same ``transcribe``: the
server's tokens must equal it, decoded on the server's one engine thread."""

from __future__ import annotations

import io
import shutil
import threading

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile", reason="needs qkv[audio]")
pytest.importorskip("multipart", reason="needs python-multipart (qkv[serve])")

from test_server import Server, _err, make_model_dir  # noqa: E402

TINY = dict(vocab_size=51865, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
            max_target_positions=12, decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257,
            bos_token_id=50257, suppress_tokens=[1, 2], begin_suppress_tokens=[220, 50257])


def _wav(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(16_000 * seconds)) / 16_000
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """(directory, HF model): random weights widened so that greedy tokens are not near-ties."""
    import transformers as tf
    from whisper_ref import whisper_tokenizer_file

    tokenizer = whisper_tokenizer_file()
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    path = tmp_path_factory.mktemp("whisper") / "tiny-whisper"
    model.save_pretrained(path)
    shutil.copy(tokenizer, path / "tokenizer.json")
    return path, model


@pytest.fixture(scope="module")
def reference(tiny_whisper):
    """transcribe() over HF's greedy decoding of the same model (the expected answers)."""
    from whisper_ref import hf_generate

    from qkv.audio.transcribe import SpeechModel, transcribe
    from qkv.loading.ct2_whisper import whisper_tokenizer

    path, model = tiny_whisper
    speech = SpeechModel(whisper_tokenizer(path / "tokenizer.json"), hf_generate(model, TINY), n_mels=80,
                         max_target_positions=TINY["max_target_positions"])
    return lambda audio, **kw: transcribe(speech, audio, **kw)


@pytest.fixture(scope="module")
def served(tiny_whisper):
    from qkv import LLM
    from qkv.server import create_app

    llm = LLM(str(tiny_whisper[0]), device="cpu", kv_cache_memory=64 << 20)
    threads: list[str] = []
    add = llm.engine.add_request

    def recording_add(*args, **kwargs):  # which thread drives the engine
        threads.append(threading.current_thread().name)
        return add(*args, **kwargs)

    llm.engine.add_request = recording_add
    s = Server(create_app(llm, "tiny-whisper"))
    yield s, llm, threads
    s.stop()
    stats = llm.stats()
    assert stats["num_blocks_in_use"] == 0
    assert stats["num_blocks_free"] + stats["num_blocks_cached"] == stats["num_blocks_total"]


def test_openai_client_gets_json_text_and_verbose_json(served, reference):
    server, llm, threads = served
    audio = _wav(2.0)
    expected = reference(audio, language="en", response_format="verbose_json")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    threads.clear()
    verbose = client.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", audio), language="en",
                                                 response_format="verbose_json")
    assert verbose.language == "english" and verbose.duration == 2.0
    assert [s.tokens for s in verbose.segments] == [s["tokens"] for s in expected["segments"]]
    assert expected["segments"][0]["tokens"], "the reference generated nothing: the comparison is empty"
    assert threads and set(threads) == {"qkv-engine"}  # decoded on the server's engine thread
    got = client.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", audio), language="en")
    assert got.text == expected["text"]
    text = client.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", audio), language="en",
                                              response_format="text")
    assert text == expected["text"]
    with pytest.raises(openai.BadRequestError, match="language: unknown language"):
        client.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", audio), language="xx")


def test_long_audio_windows_and_language_detection(served, reference):
    """40 s of audio is two windows, decoded as one batch of engine requests. Without language=
    the model's first token picks it: this random model's is no language, so the server says so
    as the reference does (the real model detects English in test_whisper_real.py)."""
    from qkv.audio.errors import AudioError

    server, llm, _ = served
    audio = _wav(40.0)
    expected = reference(audio, language="en", response_format="verbose_json")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    got = client.audio.transcriptions.create(model="tiny-whisper", file=("long.wav", audio), language="en",
                                             response_format="verbose_json")
    assert [s.tokens for s in got.segments] == [s["tokens"] for s in expected["segments"]]
    assert len(got.segments) == 2 and got.duration == 40.0
    with pytest.raises(AudioError, match="could not detect the language"):
        reference(_wav(), response_format="json")
    with pytest.raises(openai.BadRequestError, match="could not detect the language"):
        client.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", _wav()))


def test_timestamps_are_refused_by_name(served):
    """Without Whisper's timestamp rules the tokens would differ from Whisper's: refused."""
    from qkv.audio.errors import AudioError

    with pytest.raises(AudioError, match="timestamps: timestamped decoding is not supported"):
        served[1].transcribe(_wav(), language="en", timestamps=True)


def test_text_requests_to_whisper_get_a_clear_400(served):
    import httpx

    url = served[0].url
    err = _err(httpx.post(url + "/v1/completions", json={"model": "tiny-whisper", "prompt": "hi"}), 400,
               "invalid_value", "/v1/audio/transcriptions")
    assert err["param"] == "model"
    _err(httpx.post(url + "/v1/chat/completions", json={"model": "tiny-whisper", "messages": [
        {"role": "user", "content": "hi"}]}), 400, "invalid_value", "speech-to-text")


def test_bad_uploads_are_refused_by_name(served):
    import httpx

    url = served[0].url + "/v1/audio/transcriptions"
    good = {"file": ("talk.wav", _wav())}
    err = _err(httpx.post(url, files={"file": ("talk.wav", b"RIFF....WAVEjunk")}, data={"model": "tiny-whisper"}),
               400, "invalid_audio", "talk.wav: not a readable audio file")
    assert err["param"] == "file"
    _err(httpx.post(url, files=good, data={"response_format": "srt"}), 400, "unsupported_parameter", "'srt'")
    _err(httpx.post(url, files=good, data={"prompt": "hi"}), 400, "unsupported_parameter", "prompt")
    _err(httpx.post(url, files=good, data={"temperature": "0.7"}), 400, "unsupported_parameter", "temperature")
    _err(httpx.post(url, files=good, data={"model": "whisper-large"}), 404, "model_not_found")
    _err(httpx.post(url, data={"model": "tiny-whisper"}, files={"other": ("x", b"1")}), 400, "unsupported_parameter")
    _err(httpx.post(url, json={"model": "tiny-whisper"}), 400, "invalid_value", "multipart")


def test_cli_transcribes_and_refuses_bad_input(tiny_whisper, reference, tmp_path, capsys):
    from qkv import cli

    bad = tmp_path / "talk.wav"
    bad.write_bytes(b"\0" * 64)
    assert cli.main(["transcribe", str(bad), "--model", str(tiny_whisper[0])]) == 2
    assert "talk.wav: not a readable audio file" in capsys.readouterr().err
    good = tmp_path / "tone.wav"
    good.write_bytes(_wav())
    assert cli.main(["transcribe", str(good), "--model", str(tiny_whisper[0]), "--language", "en",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == reference(_wav(), language="en", response_format="text")
    text_model = make_model_dir(tmp_path / "text")
    assert cli.main(["transcribe", str(good), "--model", text_model, "--device", "cpu"]) == 2
    assert "cannot transcribe" in capsys.readouterr().err
