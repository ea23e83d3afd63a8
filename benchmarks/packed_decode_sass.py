"""Static sm_90 builds of the fast packed decode kernel (``attention/triton/packed_fast.py``), no
GPU needed: for each launch, its registers, the main loop's instruction count by opcode and by
pipe, and an md5 of the whole disassembly (two builds with the same md5 are the same SASS).
The counts in docs/benchmarks.md ("The instruction budget at 32 x 8k", session 16) come from it.

    PYTHONPATH=. python benchmarks/packed_decode_sass.py                      # the 32 x 8k default
    PYTHONPATH=. python benchmarks/packed_decode_sass.py V_WORDS=5 HEAD_MAJOR=1 BLOCK_N=32,S=1

Each argument is one launch: comma-separated ``NAME=value`` constexprs over the 32 x 8k default
(int4 K and V, head_dim 128, 8 KV heads of 4 query heads, 16-key tiles, 8 splits, 3 stages);
``num_stages`` and ``maxnreg`` set the compile options. Needs Triton (its bundled ptxas and
cuobjdump) but no device.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qkv.attention.triton import packed_fast

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TYPES = dict(Q="*bf16", C8="*u8", C16="*fp16", C32="*i32", BT="*i32", NC="*i64", QSL="*i64", ACC="*fp32",
             ML="*fp32", OUT="*bf16", ORDER="*i32", sm_scale="fp32", softcap="fp32")
DEFAULT = dict(KVH=8, G=4, G_PAD=8, D=128, BS=16, BLOCK_N=16, S=8, K_BITS=4, K_GRP=16, V_BITS=4, V_GRP=16,
               ALIGN=4, HAS_WINDOW=False, HAS_RING=False, HAS_SOFTCAP=False, IEEE=False, ASM=2, V_WORDS=4,
               LAZY=0, ROT_Q=True, ROT_O=True, LOG2D=7, L_DEFER=False, ONE_PAGE=2, K_WORDS=1, HAS_ORDER=False,
               HEAD_MAJOR=False)
# the integer ALU pipe (16 lanes a scheduler on sm_90: 2 cycles a warp instruction) and the FMA pipe
ALU = {"LOP3", "SHF", "PRMT", "IADD3", "LEA", "ISETP", "SEL", "FSEL", "FMNMX", "FSETP", "PLOP3", "IMNMX", "VIADD",
       "MOV"}
FMA = {"FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "IMAD", "F2FP"}


def build(spec: str) -> dict:
    const, opts = dict(DEFAULT), {"num_warps": 1, "num_stages": 3}
    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        value = int(value) if value.lstrip("-").isdigit() else value
        if name in ("num_stages", "maxnreg"):
            opts[name] = value
        else:
            const[name] = type(DEFAULT[name])(value) if name in DEFAULT else value
    fn = packed_fast.fast_decode_kernel
    sig = {n: ("constexpr" if n in const else TYPES.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in const and sig[n].startswith("*")}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?)\s*;", sass)]
    # the main loop: the longest backward branch
    loops = [(a - int(m.group(1), 16), int(m.group(1), 16), a) for a, s in ins
             for m in [re.search(r"BRA\s+0x([0-9a-f]+)", s)] if m and int(m.group(1), 16) < a]
    _, lo, hi = max(loops)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", s).split()[0].split(".")[0] for a, s in ins if lo <= a <= hi)
    body = "\n".join(re.sub(r"/\* 0x[0-9a-f]* \*/", "", line) for line in sass.splitlines()
                     if re.match(r"\s+/\*[0-9a-f]{4}\*/", line))
    return dict(launch=spec or "default", registers=int(re.search(r"REG:(\d+)", usage).group(1)), loop=sum(ops.values()),
                alu=sum(v for o, v in ops.items() if o in ALU), fma=sum(v for o, v in ops.items() if o in FMA),
                md5=hashlib.md5(body.encode()).hexdigest()[:8], ops=dict(ops.most_common(16)))


if __name__ == "__main__":
    for spec in sys.argv[1:] or [""]:
        print(build(spec), flush=True)
