"""One GGUF tensor, read from the memory-mapped file into a torch tensor of a chosen dtype.

Dequantization is the ``gguf`` library's (numpy, float32). A tensor that needs no layout
change is dequantized in row chunks written straight into the result, so the float32
scratch is one chunk, not the tensor (Gemma 3's 262k x 640 embedding is 671 MB in float32,
335 MB in bfloat16). Tensors that llama.cpp's converter changed are undone whole, in float32,
then cast, exactly as transformers undoes them:

* llama: Q and K rows are permuted for llama.cpp's RoPE layout (``unpermute``).
* gemma3: RMSNorm weights are stored as ``w + 1``; HF keeps ``w``.
* gpt2: the Conv1D weights are stored transposed.

Casting after the float32 arithmetic gives the same bits as the eager loader, which
returned float32 and let the engine cast the model.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

from .errors import LoadError

CHUNK_ELEMENTS = 1 << 22  # float32 scratch per chunk: 16 MiB


def needs_whole(name: str, arch: str) -> bool:
    """Whether tensor ``name`` is changed as a whole (so it is not read in chunks)."""
    kind = name.split(".")[-2] if "." in name else name
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        return True
    if arch == "gemma3" and name.endswith("norm.weight"):
        return True
    return arch == "gpt2" and name.endswith(".weight") and kind in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")


def read_tensor(t, arch: str, num_heads: int, num_kv_heads: int, path: str, dtype: torch.dtype) -> torch.Tensor:
    """GGUF tensor ``t`` (a ``gguf.TensorInfo``) as HF lays it out, in ``dtype``. A tensor
    the ``gguf`` library cannot dequantize is a LoadError naming the file and the tensor."""
    if needs_whole(t.name, arch):
        out = torch.from_numpy(_whole(t, arch, num_heads, num_kv_heads, path)).to(dtype)
    else:
        out = torch.empty(t.shape, dtype=dtype)
        rows = _plain(t.data).reshape(-1, t.data.shape[-1])  # [rows, bytes per row]
        flat = out.view(-1, t.shape[-1])
        step = max(1, CHUNK_ELEMENTS // t.shape[-1])
        fast = _TORCH.get(t.qtype.name)
        for r in range(0, rows.shape[0], step):
            if fast is not None:  # a copy of the packed bytes: torch wants writable memory
                flat[r : r + step] = fast(torch.from_numpy(np.array(rows[r : r + step]))).view(-1, t.shape[-1])
            else:
                chunk = _dequantize(t, rows[r : r + step], path)
                flat[r : r + step] = torch.from_numpy(chunk.reshape(-1, t.shape[-1]))
    release(t.data)
    return out


def read_q4_1(t, arch: str, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 tensor ``t`` [N, K] as its blocks, rows in HF's order: (codes uint8 [N, K] in
    0..15, scale d float16 [N, K/32], min m float16 [N, K/32]), ``w = codes * d + m`` per group
    of 32 along K. For int4 weights that keep the file's codes (model/int4.py's
    ``pack_q4_1``): no float copy. llama's Q/K rows are permuted back as ``unpermute`` does."""
    n, k = t.shape
    b = torch.from_numpy(np.array(_plain(t.data))).view(n, k // 32, 20)
    d, m = b[..., 0:2].contiguous().view(torch.float16)[..., 0], b[..., 2:4].contiguous().view(torch.float16)[..., 0]
    qs = b[..., 4:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).view(n, k)  # ggml's order: low nibbles, then high
    del b, qs
    kind = t.name.split(".")[-2] if "." in t.name else t.name
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        rows = torch.from_numpy(unpermute(np.arange(n), num_heads if kind == "attn_q" else num_kv_heads))
        codes, d, m = codes[rows], d[rows], m[rows]
    release(t.data)
    return codes, d, m


def release(data: np.ndarray) -> None:
    """Drop the file pages under ``data`` (a view of an ``np.memmap``) from this process's
    resident set once read: they stay in the page cache, but no longer count toward the
    process's memory while the model is built (SmolLM2: the ~100 MB of the file)."""
    mm = getattr(data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    start = data.ctypes.data - np.frombuffer(mm, dtype=np.uint8).ctypes.data
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, (start + data.nbytes) // page * page  # whole pages inside
    if last > first:
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


def _plain(data: np.ndarray) -> np.ndarray:
    """The bytes as a base ndarray: gguf splits them into thousands of views, and each view
    of an ``np.memmap`` runs its Python ``__array_finalize__`` (0.9 s of SmolLM2's load)."""
    return np.asarray(data)


def _dequantize(t, data: np.ndarray, path: str) -> np.ndarray:
    from qkv.loading.gguf import gguf_lib

    dequantize = gguf_lib().quants.dequantize

    try:
        w = dequantize(data, t.qtype)
    except Exception as e:
        raise LoadError(f"{path}: cannot dequantize tensor {t.name!r} ({t.qtype.name}): {e}") from None
    # F32 tensors come back as views of the read-only mapping: torch wants writable memory.
    return np.require(w, dtype=np.float32, requirements=["C", "W"])


def _whole(t, arch: str, num_heads: int, num_kv_heads: int, path: str) -> np.ndarray:
    fast = _TORCH.get(t.qtype.name)
    if fast is not None:
        w = fast(torch.from_numpy(np.array(t.data))).numpy().reshape(t.shape)
    else:
        w = _dequantize(t, _plain(t.data), path).reshape(t.shape)
    kind = t.name.split(".")[-2]
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        w = unpermute(w, num_heads if kind == "attn_q" else num_kv_heads)
    elif arch == "gemma3" and t.name.endswith("norm.weight"):
        w = w - 1.0
    elif arch == "gpt2":
        w = w.T
    return np.ascontiguousarray(w)


# ---------------------------------------------------------------- torch forms of gguf's numpy
# The simplest block formats (SmolLM2's GGUF is Q4_1 and Q8_0), in torch: the same float32
# operations in the same order as gguf.quants (so the same bits; tests/test_materialize.py
# checks every element against the library), ~20x faster than its numpy per-block splits.
# Every other type goes through the library. ``b``: uint8 [rows, bytes per row].
def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes -> 32 values: the low nibbles, then the high ones (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 18)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 20)
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 34)
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


_TORCH = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``: per head, rows interleaved (x0,y0,x1,y1..) back to halves (x..,y..)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
