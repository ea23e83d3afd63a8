"""``qkv compile [MODEL]``: build the ahead-of-time compiled CPU decode step of a model.

    qkv compile                      # the default model (scripts/setup.sh runs this)
    qkv compile ./my-llama --quantization int8

Exports the one-sequence decode step and the step of 2 to 255 sequences (int4 and float
layers) and compiles each into a package under ``~/.cache/qkv/aoti`` (engine/cpu_aoti.py;
minutes on 2 cores). Later ``qkv generate``,
``qkv chat`` and ``LLM(...)`` with the same model and settings (quantization, dtype, KV cache
dtype and block size) load it in milliseconds and run their decode steps through them.
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

    for flag, given in (("--compile", args.compile), ("--no-aot-decode", args.no_aot_decode)):
        if given:  # they choose how a later run decodes; here they were overridden without a word
            raise ValueError(f"{flag} chooses how a run decodes, not what qkv compile builds: drop it")
    kw = engine_kwargs(args)
    kw.update(device=kw["device"] or "cpu", aot_decode=False, log_stats=False, compile_decode=False)
    kw["num_kv_blocks"] = kw["num_kv_blocks"] or 64  # the package's page count is symbolic: a small cache will do
    llm = LLM(args.model, **kw)
    for batched in (False, True):  # the one-sequence step, then the step of 2 to MAX_BATCH sequences
        what = "batched decode step" if batched else "decode step"
        path = cpu_aoti.package_path(llm, batched)
        k = cpu_aoti.key(llm)
        if (path is not None and path.is_file() and not args.force
                and cpu_aoti._open(path, k + (cpu_aoti.BATCH_SUFFIX if batched else ""), llm.engine.model) is not None):
            print(f"compiled {what} already built: {path}", file=sys.stderr)
            continue
        t = time.perf_counter()
        try:
            path = cpu_aoti.build(llm, batched=batched)
        except ValueError as e:
            if not batched:
                raise
            print(f"no compiled {what}: {e}", file=sys.stderr)  # batched steps run eagerly
            continue
        print(f"compiled {what} built in {time.perf_counter() - t:.0f} s: {path}", file=sys.stderr)
    return 0
