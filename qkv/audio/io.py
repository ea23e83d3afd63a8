"""Reading audio: a file (via ``soundfile``) or an array, to 16 kHz mono float32 samples.

``soundfile`` (libsndfile: WAV, FLAC, OGG, MP3 ...) and ``soxr`` (resampling) are optional
dependencies imported here only; a missing one is named in the error with its install line.
"""

from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
import torch

from .errors import AudioError
from .features import SAMPLE_RATE

AudioInput = str | Path | bytes | np.ndarray | torch.Tensor


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ModuleNotFoundError(f"reading audio needs the {module!r} package: pip install 'qkv[audio]'",
                                  name=module) from e


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` (1-D float32) from ``rate`` Hz to ``target`` Hz with soxr's high-quality filter."""
    if rate == target:
        return samples
    if rate <= 0:
        raise AudioError(f"sample rate must be positive, got {rate}")
    soxr = _need("soxr")
    return np.asarray(soxr.resample(samples, rate, target, quality="HQ"), dtype=np.float32)


def load_audio(source: AudioInput, sample_rate: int | None = None, name: str | None = None) -> torch.Tensor:
    """16 kHz mono float32 samples as a 1-D CPU tensor.

    ``source`` is a file path, the file's bytes (an upload), or an array of samples. An
    array is taken as 16 kHz unless ``sample_rate`` says otherwise (a file's header gives its
    own: ``sample_rate`` with a file is refused); 2-D arrays are ``(samples, channels)`` and
    are averaged to mono (more channels than samples is refused as the other layout). ``name`` labels errors for bytes.
    Raises ``AudioError`` naming the file for a missing, empty, unreadable or non-finite input.
    """
    if isinstance(source, (np.ndarray, torch.Tensor)):
        label = name or "audio array"
        data = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        if not np.issubdtype(data.dtype, np.floating):
            raise AudioError(f"{label}: samples must be floats in [-1, 1], got dtype {data.dtype}")
        rate = SAMPLE_RATE if sample_rate is None else sample_rate  # 0 is refused, not read as "unset"
        if data.ndim == 2 and data.shape[1] > data.shape[0] > 0:
            # More channels than samples is a (channels, samples) array (torchaudio's layout):
            # averaging its rows would leave a few samples of the time-mean, transcribed as silence.
            raise AudioError(f"{label}: expected (samples, channels), got shape {data.shape}; transpose it")
    else:
        label = name or str(source)
        if sample_rate is not None:
            raise AudioError(f"{label}: sample_rate is for arrays; a file's own header gives its rate")
        data, rate = _read_file(source, label)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if data.ndim != 1:
        raise AudioError(f"{label}: expected mono or (samples, channels) audio, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise AudioError(f"{label}: audio contains NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(resample(data, int(rate))))


def _read_file(source: str | Path | bytes, label: str) -> tuple[np.ndarray, int]:
    sf = _need("soundfile")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise AudioError(f"{label}: empty upload")
        handle = _io.BytesIO(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise AudioError(f"{label}: no such audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{label}: the file is empty")
        handle = path
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except (getattr(sf, "SoundFileError", RuntimeError), RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{label}: not a readable audio file ({e})") from None
    return data, rate
