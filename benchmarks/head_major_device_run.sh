#!/bin/bash
# Issue 16, staged in session 15: head-major packed pages (kv_pages.HEAD_MAJOR, off) and twice the
# warps a scheduler at 32 x 8k, in one device call. Session 15 measured the int4 decode kernel at
# 32 x 8k over one-KV-head sequences (a tile's rows contiguous, as head-major pages make them at 8
# KV heads) at 123 us against 134, and from L2 at 119: its own work bounds it, issued by 16
# single-warp programs an SM. This call: the GPU tests of head-major pages; the decode kernels at the
# run's shape and at 32 x 8k over both layouts, with the 64-register 16-split variants and V's words
# loaded keys-fastest (v_words 5, session 16); the packed
# prefill over both layouts (8 x 2,048 over 2,048 cached); then the 1000/1000 run with token-major
# and head-major int4 pages (each its own process; RUNS picks: fp8, int8-hm, int4-w5 and int4-hm-w5 too). From the repository root
# with OUT_DIR set. ~10 min, near the call limit: PART=1 (tests, kernels, prefill, ~6 min) and PART=2
# (the engine runs, ~2 min each) split it in two calls; NO_TESTS=1 and RUNS shorten it.
# Run in session 18 (docs/benchmarks.md). Since then int4's defaults are head-major pages and
# v_words 5, so the table's "int4" run is "int4-hm-w5"; the kernel bench's token-major shapes
# still force token-major pages (kv_pages.HEAD_MAJOR False).
. benchmarks/engine_1000.sh
if [ "${PART:-all}" != 2 ]; then  # PART=1: tests, kernels, prefill; PART=2: the engine runs
device_tests 150 tests/test_triton_packed.py tests/test_triton_packed_prefill.py tests/test_kv_int.py -k "head_major or other_layout or (nibble_dots and 5-)"
date -u +"## kernels %H:%M:%S"
timeout 170 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR" --big --head-major --peers fp8 --repeat 2 \
    --variants lpt,lpt_w5 --big-variants default,w5,s16r64,s16r64p2,p2st3L8D,w5st3L8D > "$OUT_DIR/kernels.log" 2>&1
echo "## kernels rc $?"
python3 benchmarks/kv_int_shape_summary.py "$OUT_DIR/kv_int_engine_shape.jsonl"
date -u +"## prefill %H:%M:%S"
for hm in "" --head-major; do
  timeout 60 python3 benchmarks/kv_int_prefill_bench.py $hm 2>&1 | grep -E "packed prefill .* default( own)?( ahead)? " \
      | sed "s/^/${hm:-token-major} /" | cut -c1-130
done
fi
[ "${PART:-all}" = 1 ] && exit 0
engine_runs "int4-hm int4" <<'RUNS'
int4-hm int4 {"qkv.kvcache.kv_pages.HEAD_MAJOR": true}
int4 int4 {}
fp8 fp8 {}
int8-hm int8 {"qkv.kvcache.kv_pages.HEAD_MAJOR": true}
int4-w5 int4 {"qkv.attention.triton.packed.V_WORDS": 5}
int4-hm-w5 int4 {"qkv.kvcache.kv_pages.HEAD_MAJOR": true, "qkv.attention.triton.packed.V_WORDS": 5}
RUNS
date -u +"## end %H:%M:%S"
