"""One layer's attention in a mixed step of the `1000 in / 1000 out` run (issue 16): 376
sequences decoding at 1,000-2,000 keys beside 8 new 1,000-token prompts (8,376 tokens; Llama-3-8B's
attention: 32 heads, 8 KV heads, head_dim 128, blocks of 16), each entry point as the engine
calls it (the step's K/V write included):

  * int4 pages: ``backend.packed_attention`` (packed_prefill with ``mixed=True``), and variants
    of its prefill kernel (``halves``, ``rot_in_kernel``, tilings) and of the write
    (``packed.WRITE_ROT_IN_KERNEL``); pieces timed alone: the write, the query rotation GEMM,
    the decode rows;
  * fp8 and bf16 caches: ``backend.paged_attention`` (the Triton prefill + decode kernels).

Times: CUDA events, median of ``--iters``. Each int4 variant's output is compared with
``reference.packed_attention``'s (``d``: max |difference|) and its cache bytes with the
reference's write (``bytes_equal``). ``--profile``: per-kernel GPU times (torch.profiler) of
the default int4 call, the session-8 one (no halves, rotations as GEMMs) and fp8's.

    PYTHONPATH=. python benchmarks/kv_int_mixed_bench.py --out $OUT [--iters 10] [--profile]
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/kv_int_mixed_bench.py --small   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from qkv.attention import reference
from qkv.attention.batch import AttentionBatch
from qkv.attention.triton import packed, packed_prefill as pp
from qkv.attention.triton.backend import paged_attention as triton_paged
from qkv.kvcache import kv_pages
from qkv.kvcache.kv_int import resolve
from qkv.kvcache.spec import FullAttention

H, KVH, D, BS = 32, 8, 128, 16
N_DEC, N_PROMPT, PLEN = 376, 8, 1000
# name -> (packed_prefill keyword arguments, module defaults: {"packed.X" / "pp.X": value})
S8 = {"packed.WRITE_ROT_IN_KERNEL": False, "pp.ROT_KERNEL": False}
VARIANTS = {
    "default": ({}, {}),
    "session8 (no halves, rotations as GEMMs, write rot in torch)": (dict(halves=False, rot_in_kernel=False,
                                                                       compact=False), S8),
    "full grid": (dict(compact=False), {}),
    "write rot in kernel only": (dict(halves=False, rot_in_kernel=False), {"pp.ROT_KERNEL": False}),
    "halves only": (dict(halves=True, rot_in_kernel=False), S8),
    "rot kernel only": (dict(halves=False, rot_in_kernel=False), {"packed.WRITE_ROT_IN_KERNEL": False}),
    "halves + rot in prefill kernel": (dict(rot_in_kernel=True), {}),
    "no halves": (dict(halves=False), {}),
    "t128 n32 w8 s3": (dict(block_t=32, block_n=32, num_warps=8, num_stages=3), {}),
    "t128 n32 w4 s2": (dict(block_t=32, block_n=32, num_warps=4, num_stages=2), {}),
    "t128 n128 w8 s2": (dict(block_t=32, block_n=128, num_warps=8, num_stages=2), {}),
    "t64 n64 w4 s3": (dict(block_t=16, block_n=64, num_warps=4, num_stages=3), {}),
    "t256 n64 w8 s2": (dict(block_t=64, block_n=64, num_warps=8, num_stages=2), {}),
    "t256 n32 w8 s3": (dict(block_t=64, block_n=32, num_warps=8, num_stages=3), {}),
    "t256 n64 w16 s2": (dict(block_t=64, block_n=64, num_warps=16, num_stages=2), {}),
}
DEFAULTS = {"packed.WRITE_ROT_IN_KERNEL": True, "pp.ROT_KERNEL": True}


def set_defaults(knobs):
    for key, value in {**DEFAULTS, **knobs}.items():
        mod, name = key.split(".")
        setattr(packed if mod == "packed" else pp, name, value)


def timed(fn, iters):
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def kernel_table(fn, top_n=12):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    agg = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            c, t = agg.get(e.name[:60], (0, 0.0))
            agg[e.name[:60]] = (c + 1, t + e.device_time)
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top_n]
    return round(sum(v[1] for v in agg.values()), 1), [(k, c, round(t, 1)) for k, (c, t) in top]


def make_step(dev):
    rng = random.Random(0)
    computed = [rng.randrange(PLEN, 2 * PLEN) for _ in range(N_DEC)] + [0] * N_PROMPT
    qlens = [1] * N_DEC + [PLEN] * N_PROMPT
    per = [-(-(c + q) // BS) for c, q in zip(computed, qlens)]
    nb = sum(per) + 1
    perm = torch.randperm(nb).tolist()
    tables, slots = [], []
    for c, q, n in zip(computed, qlens, per):
        t = [perm.pop() for _ in range(n)]
        tables.append(t)
        slots += [t[p // BS] * BS + p % BS for p in range(c, c + q)]
    width = max(per)
    t64 = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)  # noqa: E731
    qsl = [0]
    for q in qlens:
        qsl.append(qsl[-1] + q)
    batch = AttentionBatch(query_start_loc=t64(qsl), num_computed=t64(computed), query_lens=t64(qlens),
                           max_query_len=PLEN, max_seq_len=max(c + q for c, q in zip(computed, qlens)),
                           block_size=BS, block_tables=[t64([t + [0] * (width - len(t)) for t in tables])],
                           slot_mappings=[t64(slots)], ring_blocks=[None])
    return batch, nb


def _interpreter_patch():
    """Triton 3.6's interpreter reads a scalar loop bound with int(array of shape [1]), which
    numpy >= 2.4 refuses (as tests/test_triton_packed.py patches it)."""
    from triton.runtime import interpreter as _interp

    patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_patch()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--variants", default=None, help="comma-separated names of VARIANTS (default: all)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    global H, KVH, D, N_DEC, N_PROMPT, PLEN
    if args.small:
        H, KVH, D, N_DEC, N_PROMPT, PLEN = 4, 2, 32, 3, 2, 20
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch, nb = make_step(dev)
    T = N_DEC + N_PROMPT * PLEN
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v = (torch.randn(T, n, D, device=dev, dtype=dtype) for n in (H, KVH, KVH))
    scale = D ** -0.5
    rows = []
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"

    def save():  # after every row: a run cut short by a time limit keeps what it measured
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "kv_int_mixed_bench.json"), "w") as f:
                shape = dict(decodes=N_DEC, prompts=N_PROMPT, prompt_len=PLEN, H=H, KVH=KVH, D=D, block_size=BS)
                json.dump(dict(device=name, shape=shape, rows=rows), f, indent=1)

    def rec(what, us, **kw):
        rows.append(dict(name=what, us=round(us, 1), **kw))
        print(f"{what:<62} {us:9.1f} us " + " ".join(f"{a}={b}" for a, b in kw.items()), flush=True)
        save()

    print(f"# {name}: {N_DEC} decodes at {PLEN}-{2 * PLEN} keys + {N_PROMPT} x {PLEN} new, H={H} KVH={KVH} D={D}")
    for dt in (torch.float8_e4m3fn, torch.bfloat16) if dev.type == "cuda" else ():
        cache = torch.randn(2, nb, BS, KVH, D, device=dev).to(dt)
        us = timed(lambda: triton_paged(q, k, v, cache, batch, 0, scale), args.iters)
        tag = "fp8" if dt != torch.bfloat16 else "bf16"
        rec(f"triton paged_attention ({tag} cache)", us)
        if args.profile and tag == "fp8":
            total, top = kernel_table(lambda: triton_paged(q, k, v, cache, batch, 0, scale))
            rows.append(dict(name="profile fp8", total_us=total, top=top))
            save()
            print("  profile fp8:", total, top, flush=True)
        del cache
    spec = FullAttention(KVH, D, 1, packed=resolve("int4", None, None, torch.float32)[1])
    cache = kv_pages.new_cache(spec, nb, BS, torch.uint8, dev)
    allslots = torch.arange(nb * BS, device=dev)
    kv_pages.write(cache, 0, torch.randn(nb * BS, KVH, D, device=dev), allslots)
    kv_pages.write(cache, 1, torch.randn(nb * BS, KVH, D, device=dev), allslots)
    ref_cache = cache.clone()
    ref_cache.kv_layout = cache.kv_layout
    ref = reference.packed_attention(q, k, v, ref_cache, batch, 0, scale)
    table, slots, qsl, nc = batch.block_tables[0], batch.slot_mappings[0], batch.query_start_loc, batch.num_computed

    # pieces alone
    for rot in (False, True):
        packed.WRITE_ROT_IN_KERNEL = rot
        work = cache.clone()
        work.kv_layout = cache.kv_layout
        packed.write_packed(work, k, v, slots)
        rec(f"write_packed ({'rotation in the kernel' if rot else 'kv_int.hadamard first'})",
            timed(lambda: packed.write_packed(work, k, v, slots), args.iters), bytes_equal=torch.equal(work, ref_cache))
        del work
    rec("_rotate(q) (fp32 GEMM)", timed(lambda: packed._rotate(q), args.iters))
    rec("rotate_rows(q) (Triton)", timed(lambda: pp.rotate_rows(q), args.iters),
        d=f"{(pp.rotate_rows(q).float() - packed._rotate(q).float()).abs().max().item():.2e}")
    qr = packed._rotate(q)
    rec("packed_decode of the one-token rows", timed(lambda: packed.packed_decode(
        qr, cache, table, nc, scale, max_seq_len=batch.max_seq_len, query_start_loc=qsl, rotate=False), args.iters))

    names = list(VARIANTS) if args.variants is None else args.variants.split(",")
    for vname in names:
        kw, knobs = VARIANTS[vname]
        set_defaults(knobs)

        def step():
            return pp.packed_prefill(q, k, v, cache, table, slots, qsl, nc, PLEN, scale, mixed=True,
                                     max_seq_len=batch.max_seq_len, **kw)
        try:
            out = step()
            err = (out.float() - ref.float()).abs().max().item()
            same = torch.equal(cache, ref_cache)
            us = timed(step, args.iters)
        except Exception as e:  # noqa: BLE001 - a tiling that does not compile (shared memory)
            print(f"int4 {vname}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rec(f"int4 packed_prefill mixed: {vname}", us, d=f"{err:.2e}", bytes_equal=same)
        if args.profile and vname in ("default", names[1]) and dev.type == "cuda":
            total, top = kernel_table(step)
            rows.append(dict(name=f"profile int4 {vname}", total_us=total, top=top))
            save()
            print(f"  profile int4 {vname}:", total, top, flush=True)
    set_defaults({})
    save()


if __name__ == "__main__":
    main()
