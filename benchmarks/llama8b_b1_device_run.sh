#!/bin/bash
# Llama-8B batch-1 decode on one GPU (issue 20), qkv and its peer in one call: gpt-fast compiles
# in the background while the GPU tests of the touched code run, times its decode once they are
# done, then qkv's A/B of the decode-path switches with the copy rate of the same process and
# kernel-by-kernel timelines (small_decode_ab.py, step_timeline.py; SWEEP=--gemv-sweep adds the
# GEMV shapes alone). Run from the repository root with PYTHONPATH=. and OUT_DIR set; prints a
# compact summary. TOTAL: the seconds the whole call may take.
set -u
export OUT_DIR=${OUT_DIR:-out}
mkdir -p "$OUT_DIR"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tc_b18b}
VARIANTS=${VARIANTS:-default,s9,d_rk,d_rk_ef,d_att}
TIMELINE=${TIMELINE:-s9}
SWEEP=${SWEEP:-}
RUNS=${RUNS:-3}
TOTAL=${TOTAL:-322}
T_TEST=${T_TEST:-80}
T_PEER=${T_PEER:-215}
TESTS=${TESTS:-tail or gate_up_silu or llama_rope or (fused_decode and llama) or argmax}
T0=$(date +%s)
python3 -c "import torch, triton, subprocess; print('## torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'driver', subprocess.run(['nvidia-smi','--query-gpu=driver_version','--format=csv,noheader'],capture_output=True,text=True).stdout.strip())"
FLAG=$(mktemp -u)
date -u +"## gpt-fast compile + tests %H:%M:%S"
timeout "$T_PEER" python3 benchmarks/gptfast_peer.py --fast-compile --after "$FLAG" --json "$OUT_DIR/ab.jsonl" \
    > "$OUT_DIR/peer.log" 2>&1 &
GF=$!
# (the whole pytest log goes to bench.err, the bench's stderr appended after it)
timeout "$T_TEST" python3 -m pytest -q -rfx tests/test_small_decode.py -k "$TESTS" > "$OUT_DIR/bench.err" 2>&1
echo "## tests rc $?"; grep -E "passed|failed|FAILED|XFAIL|Error" "$OUT_DIR/bench.err" | head -6 | cut -c1-400
touch "$FLAG"
date -u +"## tests done %H:%M:%S"
wait $GF; echo "## gpt-fast rc $?"; grep -E "^## |Error" "$OUT_DIR/peer.log" | tail -3
LEFT=$(( TOTAL - ($(date +%s) - T0) ))
NT=$(wc -l < "$OUT_DIR/bench.err")
date -u +"## bench %H:%M:%S (limit ${LEFT} s)"
timeout "$LEFT" python3 benchmarks/small_decode_ab.py --shape llama3-8b --copy-rate --new 128 --runs "$RUNS" \
    --variants "$VARIANTS" --timeline "$TIMELINE" $SWEEP --json "$OUT_DIR/ab.jsonl" --quiet 2>>"$OUT_DIR/bench.err"
echo "## bench rc $?"; tail -n +$((NT + 1)) "$OUT_DIR/bench.err" | grep -E "Error|error" | tail -3
date -u +"## end %H:%M:%S"
