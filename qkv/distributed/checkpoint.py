"""Per-rank reading of a safetensors checkpoint: each rank reads only its own slices.

With a Hugging Face safetensors directory, rank 0 (executor.py) reads no tensor: it sends
every rank, itself included, a ``CheckpointFiles`` (the file paths), and each rank reads
just its shard straight from the memory-mapped files (``safe_open(...).get_slice(name)[a:b]``
copies only those bytes), so no process ever holds the full weights.

The result equals ``shard_weights(load(path).weights, layout, rank)`` bit for bit (same
``slice_plan``, same float32 conversion as loading/hf.py's reader). Sources whose names or
tensors the loader transforms as it reads (GGUF: renamed, permuted, dequantized) keep the
old path: rank 0 reads them whole and slices each rank's shard (``shard_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qkv.distributed.shard import Layout, slice_plan
from qkv.loading.errors import LoadError

@dataclass(frozen=True)
class CheckpointFiles:
    """The safetensors files of one checkpoint (all its tensors, HF names as stored)."""

    files: tuple[str, ...]

    @classmethod
    def of(cls, weights) -> "CheckpointFiles | None":
        """The files behind ``weights`` when each rank can read its shard from them (a
        LazyWeights from the HF safetensors loader); None otherwise (rank 0 slices them)."""
        files = getattr(weights, "safetensors_files", None)
        return cls(tuple(str(f) for f in files)) if files else None

    def read_shard(self, layout: Layout, rank: int) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s slice of every tensor, float32, read from the files now."""
        from safetensors import safe_open

        out = {}
        for f in self.files:
            try:
                with safe_open(f, framework="pt") as st:
                    for name in st.keys():
                        out[name] = _read(st.get_slice(name), name, layout, rank)
            except LoadError:
                raise
            except Exception as e:  # SafetensorError, OSError, ...: all mean an unreadable file
                raise LoadError(f"{f}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None
        return out


def _read(sl, name: str, layout: Layout, rank: int) -> torch.Tensor:
    shape = tuple(sl.get_shape())
    how, ab = slice_plan(name, shape, layout, rank)
    if how == "zeros":
        return torch.zeros(shape, dtype=torch.float32)
    if how == "all":
        t = sl[:]
    elif how == "cols":
        t = sl[:, ab[0]:ab[1]]
    else:  # rows, or vocab rows (the last rank's part may run past the vocabulary: padded)
        a, b = min(ab[0], shape[0]), min(ab[1], shape[0])
        t = sl[a:b] if b > a else torch.zeros((0, *shape[1:]))
        if how == "vocab" and b - a < layout.vocab:
            t = torch.cat([t.to(torch.float32), torch.zeros(layout.vocab - (b - a), *shape[1:])], 0)
    return t.to(torch.float32).contiguous()  # as LazyWeights[name] (loading/hf.py) reads it
