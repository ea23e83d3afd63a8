#!/bin/bash
# Session 9's fewer-instruction options of the int4 decode kernel (one_page: scalar block-table
# entries; k_words: K as eight nibble-position dots; v_words 4: V the same), prepared then but never
# timed, in one device call (issue 16, session 13): the kernel at the 1000/1000 run's shape with the
# launch order and at 32 x 8k, then the 1000/1000 engine run with ONE_PAGE 1 + K_WORDS against the
# default, the int4 prefill tiling of session 14 and fp8 (each its own process). Session 13's
# defaults are pinned (s13; session 14 made one_page + k_words + v_words 4 the defaults). Run from the
# repository root with OUT_DIR set. ~9 min.
. benchmarks/engine_1000.sh  # (the environment, OUT_DIR, device_tests, engine_runs)
date -u +"## kernels %H:%M:%S"
timeout 200 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR" --big --peers fp8lpt --repeat 2 \
    --variants lpt_s13,lpt_op,lpt_opkw,lpt_op2kw,lpt_opw4kw,lpt_opkw_st3,lpt_opkw_r168,lpt_opkw_r128 \
    --big-variants s13,op,opkw,op2kw,opw4kw > "$OUT_DIR/kernels.log" 2>&1
echo "## kernels rc $?"
python3 benchmarks/kv_int_shape_summary.py "$OUT_DIR/kv_int_engine_shape.jsonl"
# RUNS: opkw (ONE_PAGE + K_WORDS), default, pt64 (the prefill kernel at 64 rows x 64 keys, 4 warps,
# 3 stages, which session 14 timed faster for int4 alone), fp8 (the peer, same call).
engine_runs "opkw default pt64 fp8" <<'RUNS'
opkw int4 {"ONE_PAGE": {"4": 1}, "K_WORDS": 1, "V_WORDS": 3}
default int4 {"ONE_PAGE": {"4": 0}, "K_WORDS": 0, "V_WORDS": 3}
pt64 int4 {"packed_prefill.TILING": [64, 64, 4, 3], "ONE_PAGE": {"4": 0}, "K_WORDS": 0, "V_WORDS": 3}
fp8 fp8 {}
RUNS
date -u +"## end %H:%M:%S"
