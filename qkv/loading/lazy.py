"""LazyWeights: a model's weights as a read-only mapping whose tensors are read on access.

A loader lists the tensors (names, shapes) up front and checks everything it can without
reading them; the bytes stay in the memory-mapped file until someone asks for a tensor.
``weights[name]`` is float32 (what the eager loaders returned); ``weights.read(name, dtype)``
reads it straight into ``dtype``, so a bfloat16 engine never holds a float32 copy of a big
tensor. Nothing is cached, so a consumer that takes one tensor at a time
(qkv/model/materialize.py) holds one at a time. A read already in the file's dtype may be a
view of the file's private, copy-on-write mapping (safetensors): the file is never written,
but treat reads as read-only, since two reads of one name may share memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

# name -> read(dtype) -> a fresh CPU tensor in that dtype
Reader = Callable[[torch.dtype], torch.Tensor]


class LazyWeights(Mapping):
    def __init__(self, readers: dict[str, Reader], shapes: dict[str, tuple[int, ...]] | None = None,
                 q4_1: dict[str, Callable[[], tuple]] | None = None):
        self._readers = readers
        self._shapes = shapes or {}
        self._q4_1 = q4_1 or {}
        # The safetensors files holding exactly these tensors, untransformed (set by the HF
        # loader; distributed/checkpoint.py reads each rank's slices from them); else None.
        self.safetensors_files: list | None = None
        # The GGUF file these tensors are read from (set by the GGUF loader; the key of
        # model/weight_cache.py's converted weights); else None.
        self.source: str | None = None

    def has_q4_1(self, name: str) -> bool:
        """Whether ``q4_1(name)`` reads the tensor's blocks (the file stores it as Q4_1)."""
        return name in self._q4_1

    def q4_1(self, name: str) -> tuple | None:
        """Tensor ``name`` as GGUF Q4_1 blocks, (codes uint8 [N, K], d, m float16 [N, K/32]),
        read now; None unless the file stores it so (loading/gguf_dequant.py's ``read_q4_1``)."""
        reader = self._q4_1.get(name)
        return None if reader is None else reader()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name, torch.float32)

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` read now, in ``dtype`` (KeyError for an unknown name)."""
        return self._readers[name](dtype)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The tensor's shape as the file declares it, without reading it (None if unknown)."""
        return self._shapes.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def __contains__(self, name) -> bool:
        return name in self._readers

    def __repr__(self) -> str:
        return f"LazyWeights({len(self)} tensors, read on access)"


def read_as(weights: Mapping, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``weights[name]`` in ``dtype``: read straight into it when ``weights`` is lazy."""
    if isinstance(weights, LazyWeights):
        return weights.read(name, dtype)
    return weights[name].to(dtype)
