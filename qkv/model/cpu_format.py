"""What ``quantization="auto"`` keeps the weights in on a CPU: the file's precision class.

The rule (the default of ``LLM`` and every command's ``--quantization``):

- a **GGUF** file keeps its class, read from ``general.file_type``: 2 to 5 bits a weight
  (Q2_K ... Q5_K_M, Q4_0/Q4_1/Q5_0/Q5_1, the IQ types) -> ``int4`` (model/int4.py, groups of
  32); Q6_K and Q8_0 -> ``int8`` (model/quant.py, one scale per row); F16/BF16 -> ``bf16``;
  F32 -> none (float32);
- an **HF directory** declaring bfloat16 or float16 -> ``bf16``; else none;
- anything else (Whisper's CTranslate2 directory, a GPU, an explicit ``dtype``, tensor
  parallelism) -> none: the weights run as given, float32 on the CPU.

With int4 and int8 the output projection (lm_head) is int8: the logits are the layer most
sensitive to rounding, and the GGUF files keep their embedding at 6-8 bits anyway. The
activations of every quantized class are bfloat16 (engine/dtype.py).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

# llama.cpp's llama_ftype values (general.file_type) by class.
_INT4 = {2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31}
_INT8 = {7, 18}
_BF16 = {1, 32}
_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
          11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
          17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar value types


def gguf_file_type(path: str | Path) -> int | None:
    """``general.file_type`` of a GGUF file, or None if the header does not say (or is not GGUF).
    Walks the header without decoding it: the vocabulary's strings are skipped, not read
    (Gemma's file states its type after its 262k tokens)."""
    try:
        with open(path, "rb") as f:
            head = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if head[:4] != b"GGUF":
            return None
        pos = 4 + 4 + 8
        (n_kv,) = struct.unpack_from("<Q", head, pos)
        pos += 8
        for _ in range(n_kv):
            (n,) = struct.unpack_from("<Q", head, pos)
            key = head[pos + 8 : pos + 8 + n].decode("utf-8", "replace")
            pos += 8 + n
            (vtype,) = struct.unpack_from("<I", head, pos)
            pos += 4
            if key == "general.file_type" and vtype in (4, 5):
                return struct.unpack_from("<I" if vtype == 4 else "<i", head, pos)[0]
            pos = _skip(head, pos, vtype)
    except (OSError, struct.error, ValueError, OverflowError):
        return None
    return None


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
        ft = gguf_file_type(path)
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


CHOICES = ("auto", "none", "int4", "int8", "bf16")


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
