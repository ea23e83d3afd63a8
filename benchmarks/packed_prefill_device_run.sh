#!/bin/bash
# The staged own-keys experiment (packed_prefill.OWN_FLOAT, issue 16, session 13) in one device
# call: its GPU tests, the prefill kernel alone at the 1000/1000 run's prompt step (8 x 1,000 new
# tokens, nothing cached) and at 8 x 2,048 over 2,048 cached, with and without it, one pure
# prefill step profiled, then the 1000/1000 engine run: int4 with it, int4 without, fp8 (each its
# own process). Run from the repository root with OUT_DIR set. ~8 min. Session 14 ran it: int8
# gained (now its default), int4 lost 2-3.5x (its own rows loaded as 2-byte even/odd columns);
# after the read-back's halves order, this script is int4's re-run.
. benchmarks/engine_1000.sh  # (the environment, OUT_DIR, device_tests, engine_runs)
device_tests 150 tests/test_triton_packed_prefill.py
date -u +"## kernels %H:%M:%S"
timeout 100 python3 benchmarks/kv_int_prefill_bench.py --new 1000 --cached 0 \
    --tilings "64,64,8,3;16,64,4,3;32,32,4,3;32,128,8,2" 2>&1 | grep -v "^#" | cut -c1-120
timeout 60 python3 benchmarks/kv_int_prefill_bench.py 2>&1 | grep -E "default|paged" | cut -c1-120
date -u +"## profile %H:%M:%S"
timeout 100 python3 benchmarks/mixed_step_profile.py --kv-dtype int4 --decodes 0 --variants default --top 8 \
    --set '{"packed_prefill.OWN_FLOAT": {"4": true}}' --out "$OUT_DIR" 2>&1 | grep -v "^\[" | tail -10
engine_1000 int4-own int4 '{"packed_prefill.OWN_FLOAT": {"4": true}}'
engine_1000 int4 int4 '{}'
engine_1000 fp8 fp8 '{}'
date -u +"## end %H:%M:%S"
