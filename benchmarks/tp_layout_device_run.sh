#!/bin/bash
# Issue 21 (tensor parallelism), the one-GPU part: TP=1 through the tensor-parallel layout on one
# H200, CUDA graphs with the NCCL collectives captured. From the repository root:
#   OUT=dir bash benchmarks/tp_layout_device_run.sh        (about 1-2 minutes)
# (1) tests/test_tp_layout.py: layout + graphs tokens == plain engine's == layout eager;
# (2) benchmarks/tp_layout_bench.py: batch-1 decode tok/s, plain vs layout, Llama-3.2-1B shape,
#     bf16, graphs on (and the layout eager): JSON lines in $OUT/tpgraph.jsonl.
set -u
: "${OUT:?set OUT to a folder for the logs}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
# NVLink multicast stays off (the device notes: KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
echo "[tp_layout] $(date -u +%FT%TZ) in $(pwd)"
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/card.txt"
run() {  # run TIMEOUT LOG CMD...: the command's output to $OUT/LOG, its status and last lines here
  local t=$1 f=$2; shift 2
  echo "[tp_layout] $* (timeout ${t} s) -> $OUT/$f"
  local t0=$SECONDS
  timeout -k 5 "$t" "$@" > "$OUT/$f" 2>&1
  local rc=$?
  echo "rc=$rc after $((SECONDS - t0)) s" | tee -a "$OUT/$f"
  tail -n 12 "$OUT/$f"
}
run 50 tests.txt python3 -m pytest -q -p no:cacheprovider -rs -m cuda tests/test_tp_layout.py
run 50 bench.txt python3 benchmarks/tp_layout_bench.py --out "$OUT"
echo "[tp_layout] $OUT/tpgraph.jsonl:"
cat "$OUT/tpgraph.jsonl" 2>/dev/null || echo "(none written)"
echo "[tp_layout] done $(date -u +%FT%TZ)"
