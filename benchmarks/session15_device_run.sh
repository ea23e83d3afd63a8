#!/bin/bash
# Issue 16, session 15, one device call: (1) the GPU tests of the new int4 decode defaults
# (ONE_PAGE 2, 3 stages) and of the packed prefill; (2) what bounds the int4 decode kernel at
# 32 x 8k (52% of the copy rate, whatever its pipeline depth, tile or registers, session 15 call 1):
# the same bytes from L2 (every row reads the same 256 pages) and laid out as one KV head a
# sequence (a tile's rows contiguous), fp8 beside each; (3) int4's own keys as rows in the prefill
# kernel after the halves-order fix (packed_prefill.OWN_FLOAT), alone and in the 1000/1000 run.
# From the repository root with OUT_DIR set. ~9 min.
. benchmarks/engine_1000.sh
device_tests 170 tests/test_triton_packed.py tests/test_triton_packed_prefill.py tests/test_warm_start.py \
    tests/test_decode_order.py
date -u +"## probe %H:%M:%S"
timeout 120 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR" --probe --peers fp8 --repeat 2 \
    --variants default --big-variants default,s14 > "$OUT_DIR/probe.log" 2>&1
echo "## probe rc $?"
python3 benchmarks/kv_int_shape_summary.py "$OUT_DIR/kv_int_engine_shape.jsonl"
date -u +"## prefill kernels %H:%M:%S"
timeout 80 python3 benchmarks/kv_int_prefill_bench.py --new 1000 --cached 0 --tilings "16,64,4,3" 2>&1 \
    | grep -v "^#" | cut -c1-120
timeout 60 python3 benchmarks/kv_int_prefill_bench.py 2>&1 | grep -E "default|paged" | cut -c1-120
engine_1000 int4-own int4 '{"packed_prefill.OWN_FLOAT": {"4": true}}'
engine_1000 int4 int4 '{}'
date -u +"## end %H:%M:%S"
