#!/bin/bash
# The launch-order experiment (qkv/attention/triton/order.py, QKV_DECODE_LPT; issue 16) in one device
# call: the GPU tests, the kernels at the 1000/1000 run's shape with and without the order (int4
# and fp8, interleaved), then the engine run with the order for int4 and fp8 (each its own process;
# the same runs without it are the figures of the same call when PAIR=1). Run from the repository
# root with OUT_DIR set; prints a compact summary. ~9 min with PAIR=1 (near a call's limit), ~6 without.
set -u
export PYTHONPATH=.
OUT_DIR=${OUT_DIR:-out}
mkdir -p "$OUT_DIR"
PAIR=${PAIR:-0}
date -u +"## tests %H:%M:%S"
timeout 120 python3 -m pytest -q -rf tests/test_decode_order.py > "$OUT_DIR/tests.log" 2>&1
echo "## tests rc $?"; grep -E "passed|failed|^FAILED" "$OUT_DIR/tests.log" | head -4 | cut -c1-300
date -u +"## kernels %H:%M:%S"
timeout 150 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR" --variants default,lpt \
    --peers fp8,fp8lpt --repeat 2 > "$OUT_DIR/kernels.log" 2>&1
echo "## kernels rc $?"
python3 benchmarks/kv_int_shape_summary.py "$OUT_DIR/kv_int_engine_shape.jsonl"
for kv in int4 fp8; do
  for lpt in 1 $([ "$PAIR" = 1 ] && echo 0); do
    date -u +"## engine $kv lpt=$lpt %H:%M:%S"
    mkdir -p "$OUT_DIR/$kv-$lpt"
    QKV_DECODE_LPT=$lpt timeout 150 python3 benchmarks/gpu_bench.py --out "$OUT_DIR/$kv-$lpt" --sections engine \
        --parts none --long --max-num-seqs 384 --long-requests 768 --kv-dtype $kv > "$OUT_DIR/$kv-$lpt.log" 2>&1
    echo "## rc $?"; grep -E '"workload": "768x1000' "$OUT_DIR/$kv-$lpt.log" | head -1 | cut -c1-330
  done
done
date -u +"## end %H:%M:%S"
