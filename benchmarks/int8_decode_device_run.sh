#!/bin/bash
# The int8 decode kernel at the 1000/1000 run's shape (issue 16, staged in session 14): int8's
# decode-only steps took 56.6 s of that run against fp8's 43.9 and int4's 40.0 (H200, session 14),
# and int8 has neither int4's many-row tiling (32-key tiles from 1,024 rows) nor scalar
# block-table entries (ONE_PAGE is by bits; int8's 0, never timed), and like int4 it keeps one
# tile of K/V in flight (entries a tile ahead, ONE_PAGE 2, at 3 stages: two; sm_90 build, 16-key
# tiles, 128 registers, 12.5 KB shared a warp). One device call: the kernels at the run's shape
# (longest first, as the engine launches them) and at 32 x 8k, then the 1000/1000 engine run: int8
# as it is, with 32-key many-row tiles, with entries a tile ahead at 3 stages, and fp8 (each its
# own process; RUNS picks, int8-n32op too). Run from the repository root with OUT_DIR set. ~9 min.
. benchmarks/engine_1000.sh  # (the environment, OUT_DIR, device_tests, engine_runs)
device_tests 100 tests/test_triton_packed_prefill.py
if [ -n "${PROBE:-}" ]; then  # int4 at 32 x 8k from DRAM and from L2 in one call (session 15)
  mkdir -p "$OUT_DIR/probe"
  timeout 60 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR/probe" --big --probe --peers fp8 \
      --rows 8 --variants default --big-variants default > "$OUT_DIR/probe.log" 2>&1
  echo "## probe rc $?"; grep -E '"shape": "(32|256)x8192' "$OUT_DIR/probe.log" | cut -c1-160
fi
date -u +"## kernels %H:%M:%S"
timeout 150 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR" --kv int8 --big --peers fp8lpt --repeat 2 \
    --variants lpt,lpt_op,lpt_n32,lpt_n32op,lpt_n32op2,lpt_n32st3,lpt_n32op_r128,lpt_p2st3,lpt_p2st4 \
    --big-variants default,op,n32,n32op,p2st3,p2st4 \
    > "$OUT_DIR/kernels.log" 2>&1
echo "## kernels rc $?"
python3 benchmarks/kv_int_shape_summary.py "$OUT_DIR/kv_int_engine_shape.jsonl"
engine_runs "int8 int8-n32 int8-p2st3" <<'RUNS'
int8 int8 {}
int8-n32 int8 {"FAST_TILING_MANY_ROWS": {"8": [32, 1, 2]}}
int8-p2st3 int8 {"FAST_TILING": {"8": [16, 1, 3]}, "ONE_PAGE": {"8": 2}}
fp8 fp8 {}
int8-n32op int8 {"FAST_TILING_MANY_ROWS": {"8": [32, 1, 2]}, "ONE_PAGE": {"8": 1}}
RUNS
date -u +"## end %H:%M:%S"
