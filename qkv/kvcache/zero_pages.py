"""KV pool memory that costs nothing until written.

On the CPU ``torch.zeros`` writes every byte of the pool, so a 1 GiB pool is 1 GiB resident
before the first token, whatever the requests need. A private anonymous mapping is zero by
the kernel's contract and backed page by page on first write: the pool is reserved at its
full size (addresses, block tables and the capacity line are unchanged) while resident
memory grows with the blocks actually written. Unwritten pages read as zeros, exactly what
``torch.zeros`` gave, so attention over a block's unwritten tail (masked, but multiplied
through) sees the same values as before; reading them maps the kernel's shared zero page,
which costs no memory either.

Blocks, once written, stay resident until the engine ends: the pool hands out blocks in
its eviction order (kvcache/pool.py), so a long-running server reaches its full pool over
time, as before; a one-shot ``qkv generate`` holds only what its prompt and answer wrote.
"""

from __future__ import annotations

import math
import mmap

import torch

# Below this a pool page is cheaper to allocate the ordinary way (and mmap rounds to 4 KiB).
MIN_MAPPED_BYTES = 1 << 20


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor; on the CPU (and at least MIN_MAPPED_BYTES) backed by an anonymous
    mapping whose pages become resident only when written. Elsewhere ``torch.zeros``."""
    return _zeros(shape, dtype, device, huge=False)


def huge_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``zeros`` on the CPU whose mapping asks the kernel for 2 MB pages (transparent huge
    pages, where the system gives them on request: its ``madvise`` mode), for memory written
    once and streamed whole at every CPU decode step (float32 weights): fewer TLB misses.
    Whisper base's 51,865 x 512 output projection, cold: 3.7-4.3 -> 3.1-3.2 ms (2026-12-03).
    Resident memory grows by 2 MB at a time."""
    return _zeros(shape, dtype, "cpu", huge=True)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device, huge: bool) -> torch.Tensor:
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_MAPPED_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    # frombuffer keeps ``buf`` alive as long as the tensor (or a view of it) lives.
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)
