#!/bin/bash
# Issue 16, session 9 (int4w): the many-row int4 write (packed_write.py) on the device, in one
# call of <= 240 s: the GPU tests of the touched code; the write's tilings against the one-row
# kernel and the fp8 write (bytes checked), rotate_rows' tilings; the engine's steps with prompt
# tokens per kernel (int4 with the fastest tilings, and the one-row write in the same engine;
# fp8); the 768 x 1000 in / 1000 out run at int4 with the same tilings. Run from the tree's root
# with PYTHONPATH=. ; files go to $OUT_DIR.
OUT_DIR=${OUT_DIR:-${OUT:-.}}
mkdir -p "$OUT_DIR"
left() { local l=$((238 - SECONDS)); [ $l -lt 1 ] && l=1; echo $(( $1 < l ? $1 : l )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1

echo "== tests"
timeout "$(left 60)" python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_triton_packed_prefill.py \
    tests/test_triton_packed.py -k "prefill or write or engine or rotate or rint" 2>&1 | tail -3

echo "== write / rotate_rows ($SECONDS s)"
timeout "$(left 40)" python3 benchmarks/kv_int_write_bench.py --out "$OUT_DIR" --pick > "$OUT_DIR/write.txt" 2>&1
grep -E "^(write|rotate_rows)" "$OUT_DIR/write.txt"; tail -2 "$OUT_DIR/write.txt" | grep -iE "error|Traceback"
SET=$(python3 - "$OUT_DIR/write.txt" <<'EOF'
import json, sys
knobs = {}
for line in open(sys.argv[1]):
    if line.startswith("WRITE_TILES "):
        knobs["packed.WRITE_TILES"] = json.loads(line.split(" ", 1)[1])
    if line.startswith("ROT_TILING "):
        knobs["packed_prefill.ROT_TILING"] = json.loads(line.split(" ", 1)[1])
print(json.dumps(knobs))
EOF
)
echo "set: $SET"

echo "== mixed steps, int4 ($SECONDS s)"
timeout "$(left 50)" python3 benchmarks/mixed_step_profile.py --kv-dtype int4 --decodes 200 --variants default,onerow_write \
    --top 7 --set "$SET" --out "$OUT_DIR" 2>&1 | grep -vE "^#|Warning|warn" | cut -c1-90 | tail -17

echo "== engine, int4 ($SECONDS s)"
timeout "$(left 135)" python3 benchmarks/gpu_bench.py --out "$OUT_DIR" --sections engine --parts none --long \
    --max-num-seqs 384 --long-requests 768 --kv-dtype int4 --packed-set "$SET" > "$OUT_DIR/engine.txt" 2>&1
python3 - "$OUT_DIR/engine.txt" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{") and '"throughput"' in line and "1000in" in line:
        r = json.loads(line)
        print(f"{r['workload']} {r['kv_dtype']}: {r['out_tok_s']:.0f} out tok/s, {r['seconds']:.1f} s, "
              f"steps {r['steps']}, preemptions {r['preemptions']}")
EOF
tail -3 "$OUT_DIR/engine.txt" | grep -iE "error|Traceback|Killed"

if [ $SECONDS -lt 205 ]; then
    echo "== mixed steps, fp8 ($SECONDS s)"
    timeout "$(left 35)" python3 benchmarks/mixed_step_profile.py --kv-dtype fp8 --decodes 200 --top 5 \
        --out "$OUT_DIR" 2>&1 | grep -vE "^#|Warning|warn" | cut -c1-90 | tail -6
fi
echo "== done ($SECONDS s)"
