#!/bin/bash
# Llama-8B batch-1 decode on one GPU (issue 20): an A/B of the decode-path switches with the copy
# rate of the same process, kernel-by-kernel timelines and the GEMV shapes alone
# (small_decode_ab.py, step_timeline.py), then the GPU tests of the touched code.
# Run from the repository root with PYTHONPATH=. and OUT_DIR set; prints a compact summary.
set -u
OUT_DIR=${OUT_DIR:-out}
mkdir -p "$OUT_DIR"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc_b18b}
VARIANTS=${VARIANTS:-s7,default,d_rk,d_rk_ef}
TIMELINE=${TIMELINE:-s7,default}
SWEEP=${SWEEP:-}  # --gemv-sweep: each GEMV shape alone per tile, and the step's projections alone
RUNS=${RUNS:-3}
T_BENCH=${T_BENCH:-150}
T_TEST=${T_TEST:-40}
TESTS=${TESTS:-tail or gate_up_silu or argmax or norm_linear or (fused_decode and llama)}
python3 -c "import torch, triton, subprocess; print('## torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'driver', subprocess.run(['nvidia-smi','--query-gpu=driver_version','--format=csv,noheader'],capture_output=True,text=True).stdout.strip())"
date -u +"## bench %H:%M:%S"
timeout "$T_BENCH" python3 benchmarks/small_decode_ab.py --shape llama3-8b --copy-rate --new 128 --runs "$RUNS" \
    --variants "$VARIANTS" --timeline "$TIMELINE" $SWEEP --json "$OUT_DIR/ab.jsonl" --quiet 2>"$OUT_DIR/bench.err"
echo "## bench rc $?"; grep -E "Error|error" "$OUT_DIR/bench.err" | tail -3
date -u +"## tests %H:%M:%S"
timeout "$T_TEST" python3 -m pytest -q tests/test_small_decode.py -k "$TESTS" 2>&1 | grep -E "passed|failed|FAILED|Error" | head -6
date -u +"## end %H:%M:%S"
