"""A GGUF model's int4/int8 CPU weights, converted once and memory-mapped on later loads.

Reading SmolLM2's Q4_1/Q8_0 file into the CPU formats (int4 layers packed for ATen's
kernel, the tied lm_head rounded to int8: model/materialize.py, model/quant.py) took ~0.7 s
of the README's first command's ~2.5 s. The first load writes the converted tensors to
``cache_dir()/weights/KEY.safetensors`` (``QKV_CACHE_DIR``, else ``~/.cache/qkv``); a later
load maps that file (``torch.UntypedStorage.from_file``, private and lazy: nothing is
read until used, the file is never written) and builds the same layers from it, skipping
the conversion. The tensors are the converted ones bit for bit (tests/test_weight_cache.py).

The file is safetensors, readable by the ``safetensors`` library (padding entries named
``__pad__.N`` keep every tensor 64-byte aligned, as ATen's kernels and the AOTInductor
step take them, without holes). It is keyed like the compiled decode step
(engine/cpu_aoti.py): the GGUF file (resolved path, size, modification time), the
quantization, dtype, model config and layer groups, torch's version, the CPU's instruction
set and the source of the code that converts (the files in SOURCES and the model's own);
anything else gets another key. A file is used only if its header parses, its metadata
names this key, its offsets tile the file exactly and every tensor has the name, dtype and
shape this model needs; otherwise it is refused with one line on stderr and the weights are
converted from the GGUF again (and the file rewritten). The data bytes are not checksummed:
hashing them would cost what the cache saves; the file is written whole to a temporary
name and renamed, so a crash never leaves a half-written file under a key. When a file is
written, the cache's other files of the same model and settings, and those whose GGUF is
gone, are deleted. ``QKV_WEIGHT_CACHE=0`` turns the cache off. It can only make a load
faster: a directory that cannot be written means no file, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

FORMAT = "qkv-weights-1"
ALIGN = 64
MAX_HEADER = 16 << 20  # bytes; a real header is ~50 KB
QKV_ROOT = Path(__file__).resolve().parent.parent
# The code that turns the file's tensors into the cached ones: an edit to any makes old files stale.
SOURCES = ("loading/gguf.py", "loading/gguf_dequant.py", "loading/lazy.py", "model/base.py", "model/materialize.py",
           "model/quant.py", "model/int4.py", "model/weight_cache.py")

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
           torch.bool: "BOOL"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}


class Entry(NamedTuple):
    path: Path  # where this model's file is (or will be)
    key: str
    settings: str  # the model file and settings, without versions: files sharing it are stale
    source: str  # the GGUF file, resolved


def log(msg: str) -> None:
    print(f"[qkv] {msg}", file=sys.stderr, flush=True)


def enabled() -> bool:
    return os.environ.get("QKV_WEIGHT_CACHE", "1") != "0"


def directory() -> Path:
    from qkv.loading.models import cache_dir

    return cache_dir() / "weights"


def entry(weights, model: nn.Module, groups: list[int], dtype: torch.dtype, quantization: str | None) -> Entry | None:
    """Where ``model``'s converted weights are cached, or None: not a GGUF's lazy weights, not
    int4/int8, the cache off, or nothing to key on."""
    source = getattr(weights, "source", None)
    if quantization not in ("int4", "int8") or source is None or not enabled():
        return None
    try:
        src = Path(source).resolve()
        st = src.stat()
        files = [QKV_ROOT / s for s in SOURCES]
        files += sorted({Path(sys.modules[c.__module__].__file__) for c in type(model).__mro__
                         if c.__module__.startswith("qkv.")})
        code = b"".join(f.read_bytes() for f in files)
    except (OSError, AttributeError, TypeError, KeyError):
        return None
    settings = "|".join([str(src), quantization, str(dtype)])
    parts = [settings, f"{st.st_size}|{st.st_mtime_ns}", repr(model.config), repr(list(groups)), torch.__version__,
             torch.backends.cpu.get_cpu_capability(), FORMAT]
    h = hashlib.sha256("\n".join(parts).encode())
    h.update(code)
    k = h.hexdigest()[:32]
    return Entry(directory() / f"{k}.safetensors", k, settings, str(src))


# ---------------------------------------------------------------- reading
def _open(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The file's metadata and tensors (views of its private mapping); ValueError saying what
    is wrong with a file that is not a whole, aligned safetensors file."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"header of {n:,} bytes in a file of {size:,}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ValueError("header has no metadata")
    meta = header.pop("__metadata__")
    start = 8 + n
    spans, views = [], {}
    for name, e in header.items():
        try:
            dt, shape, (begin, end) = _BY_NAME[e["dtype"]], e["shape"], e["data_offsets"]
            ok = all(type(d) is int and d >= 0 for d in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"tensor {name!r} has a malformed entry")
        item = torch.empty((), dtype=dt).element_size()
        if end - begin != math.prod(shape) * item:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {shape}")
        if not name.startswith("__pad__.") and (start + begin) % ALIGN:
            raise ValueError(f"tensor {name!r} is not {ALIGN}-byte aligned")
        spans.append((begin, end))
        views[name] = (dt, shape, (start + begin) // item)
    spans.sort()
    at = 0
    for begin, end in spans:
        if begin != at:
            raise ValueError("tensor data overlaps or leaves a hole")
        at = end
    if start + at != size:
        raise ValueError(f"data ends at byte {start + at:,}, the file at {size:,} (truncated or extended)")
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    tensors = {name: torch.empty(0, dtype=dt).set_(storage, offset, shape)
               for name, (dt, shape, offset) in views.items() if not name.startswith("__pad__.")}
    return meta, tensors


def _plan(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, quantization: str) -> tuple:
    """(rounded linears, parameters) to put, each checked against what this model needs;
    ValueError naming the first tensor that is missing, extra or of the wrong shape or dtype."""
    from qkv.model.quant import uses_int4

    left = dict(tensors)

    def take(name: str, dt: torch.dtype | None, shape: tuple) -> torch.Tensor:
        t = left.pop(name, None)
        if t is None:
            raise ValueError(f"it lacks tensor {name!r}")
        if (dt is not None and t.dtype != dt) or (dt is None and not t.is_floating_point()) or tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dt} {shape}")
        return t

    rounded, params = [], []
    taken = set()  # a linear's weight and bias: its rounded parts above
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        n, k = m.out_features, m.in_features
        if uses_int4(quantization, name.rpartition(".")[2], m):
            parts = ("int4", take(f"{name}.weight_int4", torch.uint8, (n, k // 2)),
                     take(f"{name}.scales_zeros", torch.bfloat16, (k // 32, n, 2)))
        else:
            parts = ("int8", take(f"{name}.weight_int8", torch.int8, (n, k)), take(f"{name}.scale", dtype, (n,)))
        bias = None if m.bias is None else take(f"{name}.bias", None, (n,))
        rounded.append((m, parts, bias))
        taken.update((f"{name}.weight", f"{name}.bias"))
    for name, p in model.named_parameters():  # a tied parameter under its first name, as tensors_of
        if name not in taken:
            params.append((p, take(name, dtype, tuple(p.shape))))
    if left:
        raise ValueError(f"it holds tensors this model does not have ({', '.join(sorted(left)[:3])})")
    return rounded, params


def load(model: nn.Module, e: Entry, dtype: torch.dtype, quantization: str) -> bool:
    """Put the cached weights into ``model`` (built on meta): its parameters, and each linear's
    rounded parts for model/quant.py's ``quantize`` to build from. False (``model``
    untouched) when there is no file, or with one line on stderr when it is refused."""
    from qkv.model.quant import ROUNDED

    if not e.path.is_file():
        return False
    try:
        meta, tensors = _open(e.path)
        if meta.get("format") != FORMAT or meta.get("qkv_key") != e.key:
            raise ValueError(f"its metadata names another key ({meta.get('qkv_key')}, want {e.key})")
        rounded, params = _plan(model, tensors, dtype, quantization)
    except (OSError, ValueError, RuntimeError) as err:
        log(f"weight cache {e.path} not used ({err}); converting the weights again")
        return False
    slots: dict[int, list] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, attr))
    for p, t in params:
        new = nn.Parameter(t, requires_grad=p.requires_grad)
        for module, attr in slots[id(p)]:
            module._parameters[attr] = new
    for m, parts, bias in rounded:
        m.__dict__[ROUNDED] = parts
        if bias is not None:
            m._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
    return True


# ---------------------------------------------------------------- writing
def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the cache holds of a converted model: its parameters and its int4/int8 layers'
    buffers, by name (buffers computed at construction, as RoPE tables, are not weights)."""
    from qkv.model.int4 import Int4Linear
    from qkv.model.quant import Int8Linear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            out[f"{name}.weight_int4"], out[f"{name}.scales_zeros"] = m.weight_int4, m.scales_zeros
        elif isinstance(m, Int8Linear):
            out[f"{name}.weight_int8"], out[f"{name}.scale"] = m.weight_int8, m.scale
    out.update((n, p.detach()) for n, p in model.named_parameters())
    return out


def save(model: nn.Module, e: Entry) -> bool:
    """Write ``model``'s converted tensors under ``e`` (whole, then renamed into place) and
    prune stale files; False, silently, when the cache cannot be written."""
    import tempfile  # here: a load that reads the cache never needs it
    tensors = tensors_of(model)
    if any(t.device.type != "cpu" or t.dtype not in _DTYPES for t in tensors.values()):
        return False
    header: dict = {"__metadata__": {"format": FORMAT, "qkv_key": e.key, "qkv_settings": e.settings,
                                     "qkv_source": e.source}}
    chunks, at = [], 0
    for name, t in tensors.items():
        if pad := -at % ALIGN:
            header[f"__pad__.{len(chunks)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [at, at + pad]}
            chunks.append(bytes(pad))
            at += pad
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + data.nbytes]}
        chunks.append(data)
        at += data.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)  # the data starts aligned
    try:
        e.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=e.path.parent, prefix=e.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(len(blob).to_bytes(8, "little"))
                f.write(blob)
                for c in chunks:
                    f.write(c)
            os.replace(tmp, e.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        return False
    _prune(e)
    return True


def _prune(e: Entry) -> None:
    """Delete the other files of ``e``'s model and settings, and files whose GGUF is gone."""
    for f in e.path.parent.glob("*.safetensors"):
        if f == e.path:
            continue
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                meta = json.loads(fh.read(min(n, MAX_HEADER))).get("__metadata__", {})
            stale = meta.get("qkv_settings") == e.settings or not Path(meta.get("qkv_source", "")).is_file()
        except (OSError, ValueError, AttributeError, TypeError):
            stale = False  # not ours to judge: leave it
        if stale:
            f.unlink(missing_ok=True)
