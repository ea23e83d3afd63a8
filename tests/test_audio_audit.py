"""Audit of speech to text (``POST /v1/audio/transcriptions``, ``LLM.transcribe``,
``qkv.audio``) on test_audio_server's tiny random Whisper: a client that hangs up, repeated
form fields, odd arrays and sample rates. Each case is a bug that was found and fixed."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest

sf = pytest.importorskip("soundfile", reason="needs qkv[audio]")
pytest.importorskip("multipart", reason="needs python-multipart (qkv[serve])")
httpx = pytest.importorskip("httpx")

from test_audio_server import _wav, tiny_whisper  # noqa: E402,F401  (a module fixture)
from test_server import Server, _err  # noqa: E402


def _balanced(llm) -> dict:
    stats = llm.stats()
    assert stats["num_blocks_free"] + stats["num_blocks_cached"] == stats["num_blocks_total"], stats
    return stats


@pytest.fixture(scope="module")
def gated(tiny_whisper):
    """(server, llm, gate, steps): an in-process server whose engine makes progress only while
    ``gate`` is set; closed, its steps return nothing (the loop thread still applies aborts)."""
    from qkv import LLM
    from qkv.server import create_app

    llm = LLM(str(tiny_whisper[0]), device="cpu", kv_cache_memory=64 << 20)
    gate = threading.Event()
    gate.set()
    steps = []
    step = llm.engine.step

    def gated_step():
        if not gate.is_set():
            time.sleep(0.01)
            return []
        steps.append(1)
        return step()

    llm.engine.step = gated_step
    server = Server(create_app(llm, "tiny-whisper"))
    yield server, llm, gate, steps
    gate.set()
    server.stop()
    stats = _balanced(llm)
    assert stats["num_blocks_in_use"] == 0


def _multipart(fields: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    boundary = "qkvaudit"
    body = b""
    for name, value, filename in fields:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        if filename is not None:
            body += f'; filename="{filename}"\r\nContent-Type: audio/wav'.encode()
        body += b"\r\n\r\n" + value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_a_client_that_hangs_up_aborts_its_windows(gated):
    """The handler waited for the whole transcription however long the client had been gone:
    its windows kept their cross-attention pages and the engine's time until they finished."""
    server, llm, gate, steps = gated
    body, ctype = _multipart([("file", _wav(95.0), "long.wav"), ("language", b"en", None)])  # 4 windows
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    try:
        steps.clear()
        sock.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 20
        while len(steps) < 2:  # the windows are admitted and hold blocks
            assert time.monotonic() < deadline, "the transcription never reached the engine"
            time.sleep(0.01)
        gate.clear()  # from here the engine only applies commands: nothing finishes by itself
        assert llm.stats()["num_blocks_in_use"] > 0
    finally:
        sock.close()
    deadline = time.monotonic() + 5
    while llm.stats()["num_blocks_in_use"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = _balanced(llm)
    gate.set()
    assert (stats["num_blocks_in_use"], stats["num_running"], stats["num_waiting"]) == (0, 0, 0), stats
    # and the server still answers
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("a.wav", _wav())},
                   data={"language": "en"}, timeout=60)
    assert r.status_code == 200 and "text" in r.json()


def test_a_repeated_field_is_refused_by_name(gated):
    """Only the last of two ``language`` (or ``response_format``) values was used, the first
    dropped without a word."""
    server, llm, _, _ = gated
    audio = _wav()
    for name, first, second in (("language", b"fr", b"en"), ("response_format", b"text", b"json"),
                                ("model", b"tiny-whisper", b"tiny-whisper")):
        fields = [("file", audio, "a.wav"), (name, first, None), (name, second, None)]
        if name != "language":
            fields.append(("language", b"en", None))
        body, ctype = _multipart(fields)
        r = httpx.post(server.url + "/v1/audio/transcriptions", content=body, headers={"content-type": ctype},
                       timeout=60)
        err = _err(r, 400, "invalid_value", f"{name} is given more than once")
        assert err["param"] == name
    _balanced(llm)


def test_arrays_in_the_wrong_layout_or_rate_are_refused_by_name(tmp_path):
    """A (channels, samples) array (torchaudio's layout) was averaged over time into a handful
    of samples, ``sample_rate=0`` was read as 16 kHz and a ``sample_rate`` beside a file was
    dropped: each transcribed something other than what was asked, without a word."""
    import torch

    from qkv.audio import AudioError
    from qkv.audio.io import load_audio

    t = np.arange(16_000) / 16_000
    mono = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([mono, mono], axis=1)  # (samples, channels): mixed to mono
    np.testing.assert_allclose(load_audio(stereo).numpy(), mono, atol=1e-7)
    with pytest.raises(AudioError, match=r"audio array: expected \(samples, channels\), got shape \(2, 16000\)"):
        load_audio(stereo.T)
    with pytest.raises(AudioError, match=r"audio array: .*\(2, 16000\)"):
        load_audio(torch.from_numpy(stereo.T.copy()))
    assert load_audio(np.zeros((0, 2), np.float32)).numel() == 0  # empty stereo is still empty
    with pytest.raises(AudioError, match="sample rate must be positive, got 0"):
        load_audio(mono, sample_rate=0)
    assert load_audio(mono, sample_rate=8_000).numel() == 32_000
    path = tmp_path / "tone.wav"
    sf.write(path, mono, 16_000)
    with pytest.raises(AudioError, match="tone.wav: sample_rate is for arrays"):
        load_audio(path, sample_rate=8_000)
    with pytest.raises(AudioError, match="upload: sample_rate is for arrays"):
        load_audio(path.read_bytes(), sample_rate=8_000, name="upload")


def test_a_zero_temperature_in_any_spelling_is_greedy(gated):
    # A form sends numbers as text: "0.00" is greedy decoding as much as "0", and was refused.
    server, llm, _, _ = gated
    url = server.url + "/v1/audio/transcriptions"
    good = {"file": ("talk.wav", _wav())}
    want = httpx.post(url, files=good, data={"language": "en"}, timeout=60)
    assert want.status_code == 200, want.text
    for zero in ("0.00", "0e0", "-0"):
        r = httpx.post(url, files=good, data={"temperature": zero, "language": "en"}, timeout=60)
        assert r.status_code == 200, (zero, r.text)
        assert r.json() == want.json()
    for other in ("0.01", "nan", "zero"):
        _err(httpx.post(url, files=good, data={"temperature": other, "language": "en"}, timeout=60), 400,
             "unsupported_parameter", "temperature")
    _balanced(llm)


def test_llm_transcribe_takes_an_arrays_sample_rate(gated, tmp_path):
    # LLM.transcribe had no sample_rate: samples at another rate could not be given as they are.
    _, llm, _, _ = gated
    t = np.arange(48_000) / 48_000
    tone = (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    path = tmp_path / "tone48k.wav"
    sf.write(path, tone, 48_000, subtype="FLOAT")
    want = llm.transcribe(str(path), language="en", response_format="verbose_json")
    got = llm.transcribe(tone, language="en", response_format="verbose_json", sample_rate=48_000)
    assert got == want and got["duration"] == pytest.approx(1.0)
    _balanced(llm)


def test_cli_refuses_an_unknown_language_before_the_load(tmp_path, capsys):
    # `qkv transcribe --language klingon` loaded the model first (seconds, or a missing
    # model's error), and only then said the language was unknown.
    from qkv.cli import main

    path = tmp_path / "tone.wav"
    sf.write(path, np.zeros(1_600, np.float32), 16_000)
    code = main(["transcribe", str(path), "--model", str(tmp_path / "no-such-model"), "--language", "klingon",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qkv: error: language: unknown language 'klingon'"), err
