#!/bin/bash
# Issue 16 (packed int8/int4 prefill kernel): its GPU tests, then a short timing (~90 s at most).
#   cd <a copy holding qkv/ tests/ scripts/> && OUT=dir bash benchmarks/kv_int_prefill_device_run.sh
# The test files run side by side, in four processes (Triton compiles on the host, one kernel variant at a
# time per process); the timing runs alone after them.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=$(command -v python || command -v python3)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
t() { local s=$1 f=$2; shift 2; timeout "$s" "$@" > "$OUT/$f" 2>&1; echo "rc=$?" >> "$OUT/$f"; tail -5 "$OUT/$f"; }
# (four processes: each compiles its own kernel variants, ~30 per file)
P="$PY -m pytest -q -x -p no:cacheprovider -rs"
F=tests/test_triton_packed_prefill.py
t 55 pytest_packed.txt $P tests/test_triton_packed.py &
t 55 pytest_prefill_a.txt $P $F -k "prefill-gqa or chunk-prefix" &
t 55 pytest_prefill_b.txt $P $F -k "mixed or group-3" &
t 55 pytest_prefill_c.txt $P $F -k "not (prefill-gqa or chunk-prefix or mixed or group-3)" &
wait
t 32 bench.txt $PY benchmarks/kv_int_prefill_bench.py --out "$OUT" --iters 5
