"""Log-mel features against HF's ``WhisperFeatureExtractor`` (a reference we did not write),
audio reading and resampling, windows, and the errors for malformed audio."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from qkv.audio import AudioError, log_mel, windows
from qkv.audio.features import N_SAMPLES, SAMPLE_RATE

pytest.importorskip("soundfile", reason="needs qkv[audio]")


def _hf(n_mels: int):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels)


def _synth(seconds: float, seed: int) -> np.ndarray:
    """A chirp plus a chord plus noise, with a silent gap: spectra that move and a wide dynamic range."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
    x += 0.02 * rng.standard_normal(t.size)
    x[len(x) // 3 : len(x) // 2] = 0.0
    return x.astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_hf(n_mels):
    fe = _hf(n_mels)
    rng = np.random.default_rng(n_mels)
    cases = [(rng.standard_normal(37_000) * 0.2).astype(np.float32), _synth(7.3, n_mels), _synth(30.0, 1)]
    for audio in cases:
        ref = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        ours = log_mel(torch.from_numpy(audio), n_mels).numpy()
        assert ours.shape == ref.shape == (n_mels, 3000)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    batch = np.stack([cases[0][:20_000], cases[1][:20_000] * 0.01])
    ref = fe(list(batch), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    np.testing.assert_allclose(log_mel(torch.from_numpy(batch), n_mels).numpy(), ref, atol=1e-4, rtol=0)


def test_log_mel_refuses_bad_arrays():
    with pytest.raises(AudioError, match="at most 480000"):
        log_mel(torch.zeros(N_SAMPLES + 1))
    with pytest.raises(AudioError, match="NaN"):
        log_mel(torch.tensor([0.0, float("nan")]))
    with pytest.raises(AudioError, match="float"):
        log_mel(torch.zeros(10, dtype=torch.int16))


def test_windows_cut_long_audio_into_30_second_pieces():
    audio = torch.arange(int(65.5 * SAMPLE_RATE), dtype=torch.float32)
    got = list(windows(audio))
    assert [s for s, _ in got] == [0.0, 30.0, 60.0]
    assert [w.numel() for _, w in got] == [N_SAMPLES, N_SAMPLES, int(5.5 * SAMPLE_RATE)]
    assert torch.equal(torch.cat([w for _, w in got]), audio)
    assert [w.numel() for _, w in windows(torch.zeros(0))] == [0]


def test_load_audio_resamples_and_mixes_to_mono(tmp_path):
    import soundfile as sf
    import soxr

    from qkv.audio.io import load_audio

    t = np.arange(22_050) / 22_050
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32)
    path = tmp_path / "tone.flac"
    sf.write(path, stereo, 22_050)
    got = load_audio(path)
    mono = sf.read(path, dtype="float32")[0].mean(axis=1)
    ref = soxr.resample(mono, 22_050, SAMPLE_RATE, quality="HQ")
    assert got.dtype == torch.float32 and got.shape == (16_000,)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    assert torch.equal(load_audio(path.read_bytes(), name="upload"), got)


@pytest.mark.parametrize(
    "content, match",
    [(b"", "empty"), (b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 4, "not a readable audio file"), (b"\x00" * 100, "not a readable")],
)
def test_malformed_audio_is_refused_by_name(tmp_path, content, match):
    from qkv.audio.io import load_audio

    path = tmp_path / "talk.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=match) as e:
        load_audio(path)
    assert "talk.wav" in str(e.value)
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "missing.wav")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_espeak_speech_features_match_hf(tmp_path):
    from qkv.audio.io import load_audio

    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "the quick brown fox jumps over the lazy dog"], check=True)
    audio = load_audio(path)
    assert 1.0 < audio.numel() / SAMPLE_RATE < 10.0
    ref = _hf(80)(audio.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    np.testing.assert_allclose(log_mel(audio).numpy(), ref, atol=1e-4, rtol=0)
