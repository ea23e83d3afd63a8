"""Whisper's log-mel features in torch, the same numbers as HF's ``WhisperFeatureExtractor``.

A window is 30 s of 16 kHz mono audio (480,000 samples, zero-padded at the end), framed by
a centered STFT (n_fft 400, hop 160, periodic Hann window, reflect padding) into 3,000
frames of power spectra, projected onto ``n_mels`` Slaney-normalized triangular filters on
the Slaney mel scale (0-8 kHz), then ``log10`` (floored at 1e-10), clamped to 8 decades
below the window's maximum and mapped by ``(x + 4) / 4``. 80 bins for Whisper up to
large-v2, 128 for large-v3.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch

from .errors import AudioError

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames per window

# The Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    mel = hz / _F_SP
    log_region = hz >= _MIN_LOG_HZ
    return torch.where(log_region, _MIN_LOG_MEL + torch.log(hz.clamp(min=_MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP, mel)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    hz = _F_SP * mel
    log_region = mel >= _MIN_LOG_MEL
    return torch.where(log_region, _MIN_LOG_HZ * torch.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), hz)


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The ``(n_mels, n_fft // 2 + 1)`` float32 filter bank (computed in float64, cached; do not modify)."""
    if n_mels <= 0:
        raise AudioError(f"n_mels must be positive, got {n_mels}")
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_lo, mel_hi = _hz_to_mel(torch.tensor([0.0, 8000.0], dtype=torch.float64))
    edges = _mel_to_hz(torch.linspace(float(mel_lo), float(mel_hi), n_mels + 2, dtype=torch.float64))
    widths = edges[1:] - edges[:-1]
    slopes = edges[None, :] - fft_freqs[:, None]  # (freqs, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = torch.clamp(torch.minimum(down, up), min=0)  # (freqs, n_mels)
    bank = bank * (2.0 / (edges[2:] - edges[:-2]))  # Slaney: each filter has unit area
    return bank.T.contiguous().to(torch.float32)


def log_mel(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Features of one 30-s window: ``(n_mels, 3000)`` float32 from up to 480,000 samples.

    ``audio`` is 16 kHz mono float (a 1-D tensor, or a batch ``(B, samples)`` giving
    ``(B, n_mels, 3000)``, each window normalized by its own maximum). Shorter audio is
    zero-padded to 30 s; longer audio is refused (cut it with ``windows`` first).
    """
    audio = torch.as_tensor(audio)
    if audio.dim() not in (1, 2):
        raise AudioError(f"audio must be 1-D samples (or a batch of them), got shape {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise AudioError(f"audio must be float samples in [-1, 1], got dtype {audio.dtype}")
    if audio.shape[-1] > N_SAMPLES:
        raise AudioError(f"a window holds at most {N_SAMPLES} samples (30 s at 16 kHz), got {audio.shape[-1]}")
    audio = audio.to(torch.float32)
    if not torch.isfinite(audio).all():
        raise AudioError("audio contains NaN or infinite samples")
    audio = torch.nn.functional.pad(audio, (0, N_SAMPLES - audio.shape[-1]))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # the last frame is dropped, as Whisper does
    mel = mel_filters(n_mels).to(audio.device) @ power
    logs = torch.clamp(mel, min=1e-10).log10()
    peak = logs.amax(dim=(-2, -1), keepdim=True)
    logs = torch.maximum(logs, peak - 8.0)
    return (logs + 4.0) / 4.0


def windows(audio: torch.Tensor) -> Iterator[tuple[float, torch.Tensor]]:
    """Cut 16 kHz mono audio into consecutive 30-s windows: yields ``(start_seconds, samples)``.

    The last window may be shorter (``log_mel`` pads it). Empty audio yields one empty
    window, so that a silent file still gets a (blank) transcription.
    """
    audio = torch.as_tensor(audio)
    if audio.dim() != 1:
        raise AudioError(f"audio must be 1-D mono samples, got shape {tuple(audio.shape)}")
    if audio.numel() == 0:
        yield 0.0, audio
        return
    for start in range(0, audio.numel(), N_SAMPLES):
        yield start / SAMPLE_RATE, audio[start : start + N_SAMPLES]
