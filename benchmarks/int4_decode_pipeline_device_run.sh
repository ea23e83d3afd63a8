#!/bin/bash
# The int4 decode kernel with K/V tiles 2-3 tiles ahead (issue 16, staged in session 14): with
# one_page 1 (the default) Triton's pipeliner keeps a tile's data one tile ahead at any num_stages,
# since the tile's block-table entry is loaded in the same iteration; with the entries a tile
# ahead in registers (one_page 2) it keeps 2 tiles ahead at 3 stages, 3 at 4 (sm_90 builds; see
# kv_int_engine_shape_bench.py). At 32 x 8k the kernel reads 2.2 TB/s (52%) with ~16 warps an SM
# each holding one 2.3 KB tile in flight: by Little's law that rate means ~2.2 us of loaded
# latency, so the limit may be the bytes in flight rather than the 476 instructions a tile. One device call: the GPU tests of these variants,
# the kernels at 32 x 8k and at the 1000/1000 run's shape, then the 1000/1000 engine run with
# them against the default and fp8 (each its own process; RUNS picks). From the repository root
# with OUT_DIR set. ~8 min.
. benchmarks/engine_1000.sh  # (the environment, OUT_DIR, device_tests, engine_runs)
device_tests 120 tests/test_triton_packed.py -k "deeper_pipeline or nibble_dots"
date -u +"## kernels %H:%M:%S"
timeout 150 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR" --big --peers fp8lpt,fp8 --repeat 2 \
    --variants lpt,lpt_op2w4kw,lpt_p2st3,lpt_p2st4,lpt_p2n16st3,lpt_p2n16st4 \
    --big-variants default,op2w4kw,p2st3,p2st4,p2n32st3,p2st3s16 > "$OUT_DIR/kernels.log" 2>&1
echo "## kernels rc $?"
python3 benchmarks/kv_int_shape_summary.py "$OUT_DIR/kv_int_engine_shape.jsonl"
engine_runs "int4-p2st3 int4 fp8 int4-p2n16st3" <<'RUNS'
int4-p2st3 int4 {"ONE_PAGE": {"4": 2}, "FAST_TILING": {"4": [16, 1, 3]}, "FAST_TILING_MANY_ROWS": {"4": [32, 1, 3]}}
int4 int4 {}
fp8 fp8 {}
int4-p2n16st3 int4 {"ONE_PAGE": {"4": 2}, "FAST_TILING": {"4": [16, 1, 3]}, "FAST_TILING_MANY_ROWS": {"4": [16, 1, 3]}}
RUNS
date -u +"## end %H:%M:%S"
