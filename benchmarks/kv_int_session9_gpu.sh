#!/bin/bash
# (session 9: the device script of issue 16 run from build/int4k; kept for the record of the docs command)
# int4k round 1+2 combined (issue 16): int4 decode candidates at 32 x 8k and the engine shape, GPU tests, ncu
OUT=${OUT_DIR:-.}
echo "int4k r1 start (combined) $(date -u +%H:%M:%S)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 55 python3 benchmarks/kv_int_engine_shape_bench.py --out "$OUT" --big --peers fp8 \
  --variants default,p2D_n32,p2L8D_n32,p2L8D_n16 \
  --big-variants default,op,w4,opw4kw,p2,p2D,p2L8D,p2L8D_r96,p2D_n32,p2L8D_n32 > "$OUT/bench.log" 2>&1
echo "bench rc=$? $(date -u +%H:%M:%S)"
python3 benchmarks/kv_int_shape_summary.py "$OUT/kv_int_engine_shape.jsonl"
grep -m2 "Traceback\|Error" "$OUT/bench.log" | cut -c1-200
timeout 28 python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_triton_packed.py \
  -k "nibble" > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(date -u +%H:%M:%S)"; tail -2 "$OUT/tests.log" | cut -c1-300
grep -m4 "^FAILED" "$OUT/tests.log" | cut -c1-200
timeout 25 ncu --csv --page raw --clock-control none --kernel-name regex:fast_decode --launch-skip 1 --launch-count 3 \
  --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section SpeedOfLight \
  --section Occupancy --section LaunchStats --section InstructionStats \
  python3 benchmarks/kv_int_engine_shape_bench.py --out /tmp --big --profile-only --profile-shape 32x8192 \
  --variants default,p2L8D > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc=$? $(date -u +%H:%M:%S)"; python3 benchmarks/kv_int_ncu_summary.py "$OUT/ncu.csv" 2>&1 | head -12
tail -2 "$OUT/ncu.err" | cut -c1-200
