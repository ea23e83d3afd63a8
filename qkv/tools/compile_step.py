"""``qkv compile [MODEL]``: build the ahead-of-time compiled CPU decode step of a model.

    qkv compile                      # the default model (scripts/setup.sh runs this)
    qkv compile ./my-llama --quantization int8

Exports the one-sequence decode step and compiles it into a package under
``~/.cache/qkv/aoti`` (engine/cpu_aoti.py; minutes on 2 cores). Later ``qkv generate``,
``qkv chat`` and ``LLM(...)`` with the same model and settings (quantization, dtype, KV cache
dtype and block size) load it in milliseconds and run one-sequence decode steps through it.
A package already there for these settings is kept (``--force`` rebuilds it).
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.cli import add_model_arguments

    p.add_argument("model", metavar="MODEL", nargs="?", default="smollm2",
                   help="named model, .gguf file or HF directory")
    add_model_arguments(p, model_flag=False)
    p.add_argument("--force", action="store_true", help="rebuild even if a package for these settings exists")


def run(args) -> int:
    from qkv import LLM
    from qkv.cli import engine_kwargs
    from qkv.engine import cpu_aoti

    kw = engine_kwargs(args)
    kw.update(device=kw["device"] or "cpu", aot_decode=False, log_stats=False, compile_decode=False)
    kw["num_kv_blocks"] = kw["num_kv_blocks"] or 64  # the package's page count is symbolic: a small cache will do
    llm = LLM(args.model, **kw)
    path = cpu_aoti.package_path(llm)
    if path is not None and path.is_file() and not args.force and cpu_aoti.load(llm) is not None:
        print(f"compiled decode step already built: {path}", file=sys.stderr)
        return 0
    t = time.perf_counter()
    path = cpu_aoti.build(llm)
    print(f"compiled decode step built in {time.perf_counter() - t:.0f} s: {path}", file=sys.stderr)
    return 0
