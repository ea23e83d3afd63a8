"""What ``quantization="auto"`` keeps the weights in on a CPU: the file's precision class.

The rule (the default of ``LLM`` and every command's ``--quantization``):

- a **GGUF** file keeps the class of the type that holds most of its layers' matrices
  (``blk.*``): 2 to 4 bits a weight (Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, the IQ types) -> ``int4``
  (model/int4.py, groups of 32); 5 to 8 bits (Q5_0/Q5_1/Q5_K, Q6_K, Q8_0) -> ``int8``
  (model/quant.py, one scale per row); F16/BF16 -> ``bf16``; F32 -> none (float32). A file
  with no layer tensors is classed by ``general.file_type`` the same way. The tensors decide,
  not the file's label: Gemma 3 270M's "Q4_K_M" holds 63% of its layer weights in Q5_0 (its
  640-wide rows do not fit K-quant blocks), and int4 there cost 5% perplexity; int8 none.
- an **HF directory** declaring bfloat16 or float16 -> ``bf16``; else none;
- anything else (Whisper's CTranslate2 directory, a GPU, an explicit ``dtype``, tensor
  parallelism) -> none: the weights run as given, float32 on the CPU.

A Q4_1 tensor keeps its own 4-bit codes under int4 (model/int4.py's ``pack_q4_1``); every
other tensor is read as bf16 and rounded as it is read (model/materialize.py).
With int4 and int8 the output projection (lm_head) is int8: the logits are the layer most
sensitive to rounding, and the GGUF files keep their embedding at 6-8 bits anyway. The
activations of every quantized class are bfloat16 (engine/dtype.py), except Gemma 3's with
int8 weights: float32, the int8 products alone taking x in bf16 (its perplexity moved -1.94%
from float32 with bf16 activations, -0.92% / -0.59% so: docs/benchmarks.md).
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from pathlib import Path

# llama.cpp's llama_ftype values (general.file_type) by class.
_INT4 = {2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31}
_INT8 = {7, 18}
_BF16 = {1, 32}
_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
          11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
          17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
# GGML tensor types: most of the layers' elements in one of these decides (see cpu_weight_format).
_TENSOR_CLASS = {**{t: "int4" for t in (2, 3, 10, 11, 12, *range(16, 24))},
                 **{t: "int8" for t in (6, 7, 8, 9, 13, 14, 15)}, 1: "bf16", 30: "bf16", 0: None}
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar value types


def gguf_file_type(path: str | Path) -> int | None:
    """``general.file_type`` of a GGUF file, or None if the header does not say (or is not GGUF)."""
    return _read(path)[0]


def layer_weight_types(path: str | Path) -> Counter:
    """Elements of the layers' matrices (``blk.*``, 2-D) by GGML tensor type."""
    return _read(path)[1]


def _read(path) -> tuple[int | None, Counter]:
    """Walks the header without decoding it: the vocabulary's strings are skipped, not read
    (Gemma's file states its type after its 262k tokens); then the tensor table."""
    file_type, types = None, Counter()
    try:
        with open(path, "rb") as f:
            head = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if head[:4] != b"GGUF":
            return None, types
        pos = 4 + 4
        n_tensors, n_kv = struct.unpack_from("<QQ", head, pos)
        pos += 16
        for _ in range(n_kv):
            (n,) = struct.unpack_from("<Q", head, pos)
            key = head[pos + 8 : pos + 8 + n].decode("utf-8", "replace")
            pos += 8 + n
            (vtype,) = struct.unpack_from("<I", head, pos)
            pos += 4
            if key == "general.file_type" and vtype in (4, 5):
                file_type = struct.unpack_from("<I" if vtype == 4 else "<i", head, pos)[0]
            pos = _skip(head, pos, vtype)
        for _ in range(n_tensors):
            (n,) = struct.unpack_from("<Q", head, pos)
            name = head[pos + 8 : pos + 8 + n].decode("utf-8", "replace")
            pos += 8 + n
            (ndim,) = struct.unpack_from("<I", head, pos)
            dims = struct.unpack_from(f"<{ndim}Q", head, pos + 4)
            (ttype,) = struct.unpack_from("<I", head, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 4 + 8
            if name.startswith("blk.") and ndim == 2:
                types[ttype] += dims[0] * dims[1]
    except (OSError, struct.error, ValueError, OverflowError):
        pass
    return file_type, types


def _skip(buf: bytes, pos: int, vtype: int) -> int:
    if vtype == 8:  # string
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == 9:  # array: item type, count, items
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _SIZES:
            return pos + count * _SIZES[itype]
        for _ in range(count):
            pos = _skip(buf, pos, itype)
            if pos > len(buf):
                raise ValueError("past the end of the file")
        return pos
    if vtype not in _SIZES:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return pos + _SIZES[vtype]


def cpu_weight_format(source: str | Path, config=None) -> tuple[str | None, str]:
    """(quantization, why) that "auto" picks for the weights of ``source`` on a CPU: "int4",
    "int8", "bf16" or None (float32); ``why`` names what the rule saw."""
    path = Path(source)
    if path.is_file():
        ft, types = _read(path)
        if types:  # the tensors themselves: a "Q4_K_M" file may hold most layers in Q5_0
            ttype, n = types.most_common(1)[0]
            if ttype in _TENSOR_CLASS:
                share = n / sum(types.values())
                return _TENSOR_CLASS[ttype], f"{share:.0%} of the layers' weights are GGML type {ttype}"
        if ft is None:
            return None, "the file does not state its type"
        name = _NAMES.get(ft, f"file_type {ft}")
        for fmt, types in (("int4", _INT4), ("int8", _INT8), ("bf16", _BF16)):
            if ft in types:
                return fmt, f"the GGUF is {name}"
        return None, f"the GGUF is {name}"
    declared = getattr(config, "checkpoint_dtype", None)
    if declared in ("bfloat16", "float16"):
        return "bf16", f"the checkpoint is {declared}"
    return None, f"the checkpoint is {declared or 'float32'}"


CHOICES = ("auto", "none", "int4", "int8", "bf16", "fp8")


def resolve(quantization, source, config, device, dtype="auto", tensor_parallel_size: int = 1) -> str | None:
    """The engine's ``quantization`` for an ``LLM`` argument: "auto" by the rule above, "none"
    (or None) float weights, else the name given (model/quant.py refuses an unknown one)."""
    if quantization in (None, "none"):
        return None
    if quantization != "auto":
        return quantization
    if str(device).split(":")[0] != "cpu" or dtype not in (None, "auto") or tensor_parallel_size != 1:
        return None
    return cpu_weight_format(source, config)[0]
