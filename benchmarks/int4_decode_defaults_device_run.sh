#!/bin/bash
# Session 14's new defaults in one device call (issue 16): the int4 decode kernel with one_page 1,
# k_words and v_words 4, and the prefill kernel reading int8's own keys as rows (OWN_FLOAT). The GPU
# tests of the packed kernels, the decode kernel at the 1000/1000 run's shape and at 32 x 8k against
# session 13's defaults (s13) and with block-table entries a tile ahead (op2w4kw), then the 1000/1000
# engine run: int4, int4 with session 13's decode defaults, fp8 (each its own process; RUNS picks).
# NO_TESTS / NO_KERNELS skip those parts. Run from the repository root with OUT_DIR set. ~8 min.
. benchmarks/engine_1000.sh  # (the environment, OUT_DIR, device_tests, engine_runs)
device_tests 200 tests/test_triton_packed.py tests/test_triton_packed_prefill.py tests/test_warm_start.py tests/test_decode_order.py
if [ -z "${NO_KERNELS:-}" ]; then
  date -u +"## kernels %H:%M:%S"
  timeout 100 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR" --big --peers fp8lpt --repeat 2 \
      --variants lpt,lpt_s13,lpt_op2w4kw --big-variants default,s13,op2w4kw > "$OUT_DIR/kernels.log" 2>&1
  echo "## kernels rc $?"
  python3 benchmarks/kv_int_shape_summary.py "$OUT_DIR/kv_int_engine_shape.jsonl"
fi
engine_runs "int4 int4-s13 fp8" <<'RUNS'
int4 int4 {}
int4-s13 int4 {"ONE_PAGE": {"4": 0}, "K_WORDS": 0, "V_WORDS": 3}
fp8 fp8 {}
int8 int8 {}
int8-noown int8 {"packed_prefill.OWN_FLOAT": {"8": false}}
RUNS
date -u +"## end %H:%M:%S"
