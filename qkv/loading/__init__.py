"""Model loading: one entry point, ``load``, for every supported source.

``load(name_or_path)`` accepts a named default ("smollm2", "gemma3-270m", "whisper-base"), a
``.gguf`` file, a Hugging Face directory or a CTranslate2 Whisper directory (``model.bin``),
and returns a ``LoadedModel``:
a ``ModelConfig``, CPU weights keyed by HF transformers parameter names (for GGUF and
safetensors a ``LazyWeights``: read from the memory-mapped file on access, float32 unless
asked for another dtype), the tokenizer (None when the source has none) and the resolved path.
Every failure raises ``LoadError`` whose message names the file.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from typing import NamedTuple

import torch

from qkv.config import ModelConfig

from .errors import LoadError
from .models import NAMED, resolve
from .tokenizer import ChatTemplateError, StreamDecoder, Tokenizer

__all__ = ["load", "LoadedModel", "LoadError", "Tokenizer", "StreamDecoder", "ChatTemplateError", "NAMED"]


class LoadedModel(NamedTuple):
    config: ModelConfig
    weights: Mapping[str, torch.Tensor]  # a dict, or LazyWeights (loading/lazy.py)
    tokenizer: Tokenizer | None
    source: str  # the file or directory actually read


def load(name_or_path: str | Path) -> LoadedModel:
    """Load a named default, a ``.gguf`` file, an HF directory or a CTranslate2 Whisper directory."""
    from .gguf import load_gguf
    from .hf import load_hf

    name = str(name_or_path)
    path = resolve(name) if name in NAMED else Path(name).expanduser()
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory (known names: {', '.join(NAMED)})")
    if path.is_dir():
        if (path / "model.bin").is_file() and not any(path.glob("*.safetensors")):
            from .ct2_whisper import load_ct2_dir

            return LoadedModel(*load_ct2_dir(path), source=str(path))
        return LoadedModel(*load_hf(path), source=str(path))
    if path.suffix == ".gguf" or _has_gguf_magic(path):
        return LoadedModel(*load_gguf(str(path)), source=str(path))
    raise LoadError(f"{path}: not a .gguf file or a Hugging Face model directory")


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"
