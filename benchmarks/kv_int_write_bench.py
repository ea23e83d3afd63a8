"""The quantizing write into int4 pages (issue 16): ``packed.write_packed`` at a mixed step's
8,200 tokens and a decode step's 384 (Llama-3-8B: 8 KV heads of 128, bf16 k/v as slices of
the fused QKV output, rotated planes), one-row programs against ``packed_write``'s tilings
(rows a program x warps), each checked byte for byte against ``kv_pages.write``; the fp8
write (``kv_write.write_kv``) of the same rows as the peer. Prints one line per size and, with
``--pick``, writes the fastest tiling per size as a ``packed.WRITE_TILES`` value (JSON).

    PYTHONPATH=. python benchmarks/kv_int_write_bench.py --out $OUT --pick
"""

from __future__ import annotations

import argparse
import json
import os

import torch

TILINGS = [(0, 1), (2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8), (32, 8)]


def timed(fn, iters=40):
    fn()
    if not torch.cuda.is_available():  # (Triton's interpreter: a run of the script's logic, no timing)
        return 0.0
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / iters)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", default="8200,384")
    ap.add_argument("--pick", action="store_true")
    args = ap.parse_args()
    from qkv.attention.triton.kv_write import write_kv
    from qkv.attention.triton.packed import write_packed
    from qkv.kvcache import kv_pages
    from qkv.kvcache.kv_int import resolve
    from qkv.kvcache.spec import FullAttention

    dev, H, KVH, D, bs = "cuda" if torch.cuda.is_available() else "cpu", 32, 8, 128, 16
    recs, pick = [], []
    for T in [int(t) for t in args.tokens.split(",")]:
        g = torch.Generator(device=dev).manual_seed(T)
        qkv = torch.randn(T, H + 2 * KVH, D, generator=g, device=dev).to(torch.bfloat16 if dev == "cuda" else torch.float32)
        k, v = qkv[:, H:H + KVH], qkv[:, H + KVH:]
        nb = T // bs + 8
        slots = torch.randperm(nb * bs, generator=g, device=dev)[:T]
        spec = FullAttention(KVH, D, 1, packed=resolve("int4", None, None, torch.bfloat16)[1])
        ref = kv_pages.new_cache(spec, nb, bs, torch.uint8, dev)
        kv_pages.write(ref, 0, k, slots)
        kv_pages.write(ref, 1, v, slots)
        res = {}
        for rows, warps in TILINGS:
            cache = kv_pages.new_cache(spec, nb, bs, torch.uint8, dev)
            fn = lambda: write_packed(cache, k, v, slots, rows=rows, num_warps=warps)  # noqa: E731
            fn()
            same = torch.equal(cache, ref)
            res[f"{rows}x{warps}"] = (round(timed(fn), 2), same)
        fp8 = torch.zeros(2, nb, bs, KVH, D, dtype=torch.float8_e4m3fn, device=dev)
        t8 = timed(lambda: write_kv(fp8, k, v, slots))
        ok = {n: t for n, (t, same) in res.items() if same and n != "0x1"}
        best = min(ok, key=ok.get) if ok else None
        recs.append(dict(bench="kv_int_write", tokens=T, rows=T * KVH, us=res, fp8_us=round(t8, 2), best=best))
        print(f"write T={T}: one-row {res['0x1'][0]} us | " + " ".join(
            f"{n} {t}{'' if s else ' BAD'}" for n, (t, s) in res.items() if n != "0x1")
            + f" | best {best} | fp8 {t8:.2f} us", flush=True)
        if best:
            pick.append((T * KVH, *map(int, best.split("x"))))
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    # rotate_rows (the query and the output of a mixed step's ~4,100 tokens x 32 heads): its tilings
    from qkv.attention.triton import packed_prefill as pp

    x = torch.randn(4100, H, D, device=dev).to(qkv.dtype)
    ref_rot, rot = None, {}
    for tiling in [(64, 4), (32, 4), (128, 4), (128, 8), (256, 8)]:
        pp.ROT_TILING = tiling
        y = pp.rotate_rows(x)
        ref_rot = y if ref_rot is None else ref_rot
        rot[f"{tiling[0]}x{tiling[1]}"] = (round(timed(lambda: pp.rotate_rows(x)), 2), torch.equal(y, ref_rot))
    pp.ROT_TILING = (64, 4)
    gbs = 2 * x.numel() * x.element_size() / 1e3  # bytes read and written, over us: GB/s
    best_rot = min(rot, key=lambda n: rot[n][0])
    recs.append(dict(bench="rotate_rows", rows=4100 * H, us=rot, best=best_rot))
    print("rotate_rows 4100x32: " + " ".join(f"{n} {t} us{'' if s else ' DIFF'}" for n, (t, s) in rot.items())
          + f" | best {best_rot}: {gbs / max(rot[best_rot][0], 1e-9):.0f} GB/s", flush=True)
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        for r in recs[-1:]:
            f.write(json.dumps(r) + "\n")
    if args.pick:
        print("ROT_TILING " + json.dumps(list(map(int, best_rot.split("x")))))
        # the largest size's tiling above the midpoint of the sizes, the next below, ...
        pick.sort(key=lambda p: -p[0])
        tiles = [((p[0] + nxt[0]) // 2, p[1], p[2]) for p, nxt in zip(pick, pick[1:])] + [(0, *pick[-1][1:])]
        print("WRITE_TILES " + json.dumps(tiles))


if __name__ == "__main__":
    main()
