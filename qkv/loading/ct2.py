"""A reader for CTranslate2's ``model.bin`` (binary versions 4-6). Not pickle: plain data.

Layout (little-endian; read from CTranslate2's ``ModelSpec._serialize`` and ``models/model.cc``)::

    u32 binary_version          4..6 here (4 added the dtype id; 5, 6 kept the layout)
    str spec_name               e.g. "WhisperSpec"
    u32 spec_revision
    u32 num_variables, then for each:
        str name                "encoder/layer_0/self_attention/linear_0/weight"
        u8  rank, u32 dims[rank]
        u8  dtype               0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16
        u32 num_bytes           must equal prod(dims) * itemsize
        raw bytes
    u32 num_aliases, then (str alias, str target) pairs
    str := u16 length (counting a final NUL), the UTF-8 bytes, NUL

Every count is checked against what is left of the file before anything is allocated, and
anything left over after the aliases is refused: a truncated, padded or foreign file raises
``LoadError`` naming the file, the offset and the field. Quantized weights (``X`` with an
``X_scale`` beside it: int8 per row, int16 per layer) are dequantized as CTranslate2 does,
``X / X_scale``.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import LoadError

_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
_VERSIONS = (4, 5, 6)
_MAX_RANK = 8


class CT2File(NamedTuple):
    spec: str  # the model spec's name, e.g. "WhisperSpec"
    revision: int
    binary_version: int
    variables: dict[str, torch.Tensor]  # CTranslate2 names; aliases resolved; quantized weights as float32
    aliases: dict[str, str]  # alias -> the variable it names (already present in ``variables``)


class _Cursor:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = memoryview(data), 0, path

    def fail(self, msg: str) -> LoadError:
        return LoadError(f"{self.path}: not a valid CTranslate2 model.bin: {msg} (offset {self.pos}, file size {len(self.data)})")

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.data) - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes, {len(self.data) - self.pos} left")
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def u(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.u("H", f"length of {what}")
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise self.fail(f"{what} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def read_model_bin(path: str | Path) -> CT2File:
    """Parse ``path`` into float/int tensors keyed by CTranslate2 names (a fresh CPU copy; the
    caller owns it). Raises ``LoadError`` naming the file for anything malformed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror or e})") from None
    cur = _Cursor(data, path)
    version = cur.u("I", "binary version")
    if version not in _VERSIONS:
        raise cur.fail(f"binary version {version} is not one this reader knows ({', '.join(map(str, _VERSIONS))})")
    spec = cur.string("spec name")
    revision = cur.u("I", "spec revision")
    count = cur.u("I", "variable count")
    # The smallest record is a 1-char name, rank 0, dtype, size: 2 + 2 + 1 + 1 + 4 bytes.
    if count > (len(data) - cur.pos) // 10:
        raise cur.fail(f"{count} variables cannot fit in the {len(data) - cur.pos} bytes left")
    variables: dict[str, torch.Tensor] = {}
    for i in range(count):
        name = cur.string(f"name of variable {i}")
        if name in variables:
            raise cur.fail(f"variable {name!r} appears twice")
        rank = cur.u("B", f"rank of {name!r}")
        if rank > _MAX_RANK:
            raise cur.fail(f"variable {name!r} has rank {rank} (at most {_MAX_RANK})")
        shape = [cur.u("I", f"shape of {name!r}") for _ in range(rank)]
        type_id = cur.u("B", f"dtype of {name!r}")
        if type_id not in _DTYPES:
            raise cur.fail(f"variable {name!r} has unknown dtype id {type_id}")
        dtype = _DTYPES[type_id]
        nbytes = cur.u("I", f"byte count of {name!r}")
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected:
            raise cur.fail(f"variable {name!r} of shape {shape} and {dtype} needs {expected} bytes, header says {nbytes}")
        raw = cur.take(nbytes, f"data of {name!r}")
        variables[name] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    aliases: dict[str, str] = {}
    for i in range(cur.u("I", "alias count")):
        alias = cur.string(f"alias {i}")
        target = cur.string(f"target of alias {alias!r}")
        if target not in variables:
            raise cur.fail(f"alias {alias!r} names a missing variable {target!r}")
        if alias in variables:
            raise cur.fail(f"alias {alias!r} shadows a variable")
        aliases[alias] = target
    if cur.pos != len(data):
        raise cur.fail(f"{len(data) - cur.pos} unexpected bytes after the last alias")
    for alias, target in aliases.items():
        variables[alias] = variables[target]
        if target + "_scale" in variables:
            variables[alias + "_scale"] = variables[target + "_scale"]
    return CT2File(spec, revision, version, _dequantize(variables, path), aliases)


def _dequantize(variables: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = dict(variables)
    for name, scale in variables.items():
        if not name.endswith("_scale") or name[: -len("_scale")] not in variables:
            continue
        base = name[: -len("_scale")]
        value = variables[base]
        if value.dtype not in (torch.int8, torch.int16):
            continue
        if base + "_zero" in variables:
            raise LoadError(f"{path}: {base!r} uses AWQ zero points, which this reader does not support")
        scale = scale.to(torch.float32)
        if scale.numel() not in (1, value.shape[0]) or not torch.all(scale != 0):
            raise LoadError(f"{path}: {name!r} of shape {list(scale.shape)} cannot scale {base!r} of shape {list(value.shape)}")
        scale = scale.reshape(-1, *([1] * (value.dim() - 1))) if scale.numel() > 1 else scale
        out[base] = value.to(torch.float32) / scale
        del out[name]
    return out
