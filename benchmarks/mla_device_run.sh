#!/bin/bash
# Issue 14 (MLA prefill/extend): the one device run behind docs/benchmarks.md's MLA rows.
#   OUT=dir bash benchmarks/mla_device_run.sh
# The CPU-only HF parity tests (tests/test_mla.py) run on cores 8-15 beside the GPU work, which
# keeps cores 0-7 (the benches' host threads).
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/card.txt" 2>&1
taskset -c 8-15 env OMP_NUM_THREADS=8 timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_mla.py \
  > "$OUT/test_mla.txt" 2>&1 &
cpu=$!
run() { local t=$1 f=$2; shift 2; taskset -c 0-7 timeout "$t" "$@" > "$OUT/$f" 2>&1; echo "rc=$?" >> "$OUT/$f"; tail -4 "$OUT/$f"; }
run 100 test_gpu.txt python3 -m pytest -q -p no:cacheprovider tests/test_mla_prefill.py tests/test_moe_kernel.py
run 30 kernel.txt python3 benchmarks/mla_prefill_bench.py --out "$OUT"
run 50 bench_bf16.txt python3 benchmarks/gpu_bench.py --out "$OUT" --sections engine --shape deepseek-v2-lite \
  --max-num-seqs 128 --parts prefill,b1,tput --tput-requests 128
run 40 bench_fp8.txt python3 benchmarks/gpu_bench.py --out "$OUT" --sections engine --shape deepseek-v2-lite \
  --max-num-seqs 128 --parts prefill,b1,tput --tput-requests 128 --kv-dtype fp8
run 30 cli_tput.txt python3 -m qkv.cli bench throughput --random-weights deepseek-v2-lite --dtype bfloat16 \
  --num-requests 128 --input-len 512:512 --output-len 256:256 --max-num-seqs 128 --max-num-batched-tokens 8192
wait $cpu; echo "rc=$?" >> "$OUT/test_mla.txt"; tail -3 "$OUT/test_mla.txt"
