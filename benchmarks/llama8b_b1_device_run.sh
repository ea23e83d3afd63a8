#!/bin/bash
# Llama-3-8B batch-1 decode on one GPU (issue 20): the GPU tests of the touched code, then an A/B
# of the decode-path switches with the copy rate of the same process and per-kernel profiles.
# Run from the repository root with PYTHONPATH=. and OUT_DIR set; prints a compact summary.
set -u
OUT_DIR=${OUT_DIR:-out}
mkdir -p "$OUT_DIR"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc_b18b}
VARIANTS=${VARIANTS:-main,default,qr,pf_o,pf2,pf_all,ef,pf_o_ef,qr_pf_o,pf2_ef,pf4,ropekv,wide}
PROFILE=${PROFILE:-main,default}
RUNS=${RUNS:-2}
T_BENCH=${T_BENCH:-150}
T_TEST=${T_TEST:-40}
TESTS=${TESTS:-stream or rope_kv or qkv_rope or prefetch or argmax or (fused_decode and llama)}
python3 -c "import torch, triton, subprocess; print('## torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'driver', subprocess.run(['nvidia-smi','--query-gpu=driver_version','--format=csv,noheader'],capture_output=True,text=True).stdout.strip())"
date -u +"## tests %H:%M:%S"
timeout "$T_TEST" python3 -m pytest -q tests/test_small_decode.py -k "$TESTS" 2>&1 | grep -E "passed|failed|FAILED|Error" | head -6
date -u +"## bench %H:%M:%S"
timeout "$T_BENCH" python3 benchmarks/small_decode_ab.py --shape llama3-8b --copy-rate --new 128 --runs "$RUNS" \
    --variants "$VARIANTS" --profile-variants "$PROFILE" --json "$OUT_DIR/ab.jsonl" --quiet 2>"$OUT_DIR/bench.err"
echo "## bench rc $?"; grep -E "Error|error" "$OUT_DIR/bench.err" | tail -3
date -u +"## end %H:%M:%S"
