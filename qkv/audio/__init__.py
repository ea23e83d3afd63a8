"""Audio input for speech models (Whisper): reading files, log-mel features, 30-second
windows, and ``transcribe``, which drives a model's greedy decoder over the windows.

Optional libraries (``soundfile``, ``soxr``) are imported only when a file is read or
resampled; install them with ``pip install 'qkv[audio]'``.
"""

from .errors import AudioError
from .features import CHUNK_SECONDS, HOP_LENGTH, N_FFT, SAMPLE_RATE, log_mel, mel_filters, windows

__all__ = ["AudioError", "log_mel", "mel_filters", "windows", "SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "CHUNK_SECONDS"]
