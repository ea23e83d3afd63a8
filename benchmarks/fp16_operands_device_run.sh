#!/bin/bash
# Issue 16, staged in session 18: the int4 decode kernel at 32 x 8k reaches 63.6% of the copy rate
# (112.6 us, head-major pages and V's words keys-fastest, the defaults since session 18) against
# the target's 75% (95 us). This call measures the one lever left that keeps the format: fp16
# operands, where a nibble at bits 4-7 widens without a shift (bf16's bit 7 is an exponent bit).
# It times the kernel with bf16 and with fp16 queries (the fp16 path serves fp16 models today),
# over head-major pages, and the L2-resident probe of each (what the kernel's own work takes).
# From the repository root with OUT_DIR set; ~3 min.
. benchmarks/engine_1000.sh
device_tests 150 tests/test_triton_packed.py -k "int4 and not int8"
for dt in bf16 fp16; do
  date -u +"## kernels $dt %H:%M:%S"
  timeout 150 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT_DIR" --big --head-major --probe \
      --peers "" --repeat 2 --variants lpt --big-variants default --q-dtype $dt > "$OUT_DIR/kernels-$dt.log" 2>&1
  echo "## rc $?"
  python3 benchmarks/kv_int_shape_summary.py "$OUT_DIR/kv_int_engine_shape.jsonl" | grep -E "/hm|L2|kvh1|copy"
  mv "$OUT_DIR/kv_int_engine_shape.jsonl" "$OUT_DIR/kv_int_engine_shape-$dt.jsonl"
done
date -u +"## end %H:%M:%S"
