"""Small C kernels for the CPU path, compiled on first use with the system's C compiler.

A few CPU steps are one simple loop that torch can only run as several full passes over
memory (model/int4.py's int4 -> bf16 unpack: five ops, each reading and writing the whole
weight). Their C source lives in ``model/csrc/``; ``library(name)`` compiles it once with
``cc -O3 -march=native`` (about 0.1 s) into ``cache_dir()/native`` (``QKV_CACHE_DIR``, else
``~/.cache/qkv``) and loads it with ctypes. The file name is a hash of the source, the flags
and this CPU's model and flags, so an edited source or another machine sharing the cache
directory builds its own copy and never loads one built for other instructions.

Optional by design: no compiler, a failed build, or ``QKV_NATIVE=0`` gives ``None`` and the
callers run their torch code, which the tests hold these kernels equal to bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fPIC")
# Per source, after FLAGS: decode_attn's softmax takes glibc's vectorized expf (libmvec), which
# GCC calls only under -ffast-math; its C is written for that (no infinities, no NaN tests).
# The object is compiled and linked in two steps: -ffast-math on a link line adds crtfastmath.o,
# whose constructor turns on flush-to-zero and denormals-are-zero for the whole process when the
# library loads (every torch op after it would lose subnormals; tests/test_decode_native.py).
# -fopenmp: the library needs libgomp.so.1, the soname torch's own copy already loaded has,
# so its parallel loops run on torch's thread pool (loaded after torch, never before).
EXTRA = {"decode_attn": (("-ffast-math", "-fopenmp"), ("-lm",)),
         "int4_unpack": (("-fopenmp",), ()), "int4_rows": (("-fopenmp",), ()),
         "int8_gemv": (("-fopenmp",), ())}  # (compiler flags, libraries)

_loaded: dict[str, ctypes.CDLL | None] = {}
_functions: dict[str, object] = {}  # "library:symbol" -> the typed ctypes function, or None
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("QKV_NATIVE", "1") != "0"


def _cpu_id() -> str:
    """This CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _build(name: str) -> ctypes.CDLL | None:
    from qkv.loading.models import cache_dir

    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    src = SOURCES / f"{name}.c"
    cflags, libs = EXTRA.get(name, ((), ()))
    flags = (*FLAGS, *cflags)
    h = hashlib.sha256(b"\0".join([src.read_bytes(), " ".join(flags + libs).encode(), _cpu_id().encode(), cc.encode()]))
    out = cache_dir() / "native" / f"{name}-{h.hexdigest()[:24]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".tmp.so")
        os.close(fd)
        try:
            obj = tmp[:-3] + ".o"
            r = subprocess.run([cc, "-c", *flags, "-o", obj, str(src)], capture_output=True, text=True, timeout=120)
            if r.returncode == 0:  # the link without the compile-only flags (no crtfastmath.o)
                link = ("-fopenmp",) if "-fopenmp" in flags else ()
                r = subprocess.run([cc, "-shared", *link, "-o", tmp, obj, *libs], capture_output=True, text=True,
                                   timeout=120)
            if os.path.exists(obj):
                os.unlink(obj)
            if r.returncode != 0:
                print(f"[qkv] {src.name} did not compile, using torch ops: {r.stderr.strip()[:300]}",
                      file=sys.stderr, flush=True)
                return None
            os.replace(tmp, out)  # atomic: a concurrent process sees no file or a whole one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(out))


def library(name: str) -> ctypes.CDLL | None:
    """``model/csrc/NAME.c`` compiled and loaded (once a process), or None (module docstring)."""
    if not enabled():
        return None
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _build(name)
            except (OSError, subprocess.SubprocessError) as e:
                print(f"[qkv] {name}.c: {e}; using torch ops", file=sys.stderr, flush=True)
                _loaded[name] = None
        return _loaded[name]


def function(name: str, symbol: str, argtypes: list, restype=None):
    """``symbol`` of ``library(name)`` typed with ``argtypes`` and ``restype``, looked up
    once a process; None where the library is not there (the caller runs its torch code)."""
    key = f"{name}:{symbol}"
    if key not in _functions:
        lib = library(name)
        fn = None
        if lib is not None:
            fn = getattr(lib, symbol)
            fn.restype = restype
            fn.argtypes = argtypes
        _functions[key] = fn
    return _functions[key]


_operators: dict[str, tuple | None] = {}  # name -> (Library, torch.ops.qkv.<name>) or None


def operator(schema: str, impl, fake, available) -> object | None:
    """The torch operator ``qkv::<name>`` of ``schema`` ("name(Tensor x, ...) -> Tensor"), its
    CPU kernel ``impl`` and its shape function ``fake`` (for export), defined once a process,
    or None when ``available()`` says the C kernel behind it is not there. What a compiled
    decode step calls (engine/cpu_aoti.py): the exported graph holds one node the package calls
    back into, so the operator must exist before a package that uses it is loaded."""
    name = schema.split("(", 1)[0]
    if name not in _operators:
        if not available():
            _operators[name] = None
        else:
            import torch

            lib = torch.library.Library("qkv", "FRAGMENT")
            lib.define(schema)
            lib.impl(name, impl, "CPU")
            torch.library.register_fake(f"qkv::{name}", lib=lib)(fake)
            _operators[name] = (lib, getattr(torch.ops.qkv, name))  # the Library kept alive: it owns the definition
    entry = _operators[name]
    return entry[1] if entry else None
