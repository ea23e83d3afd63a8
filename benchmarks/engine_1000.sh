# Sourced by the device scripts (run from the repository root with OUT_DIR set): it sets up the
# environment and $OUT_DIR, and defines
#   device_tests TIMEOUT ARGS...: pytest ARGS on 12 workers (skipped when NO_TESTS is set), its log
#     in $OUT_DIR/tests.log, its summary printed;
#   engine_1000 NAME KV SET: the 768 x 1000 in / 1000 out engine run (Llama-3-8B's shape, random
#     bf16 weights, 384 sequences at once) in its own process, with SET (JSON) as gpu_bench.py
#     --packed-set, its output in $OUT_DIR/NAME{,.log}, its result line printed; ENGINE_TIMEOUT
#     (s, default 140) bounds it;
#   engine_runs DEFAULT (below).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT_DIR=${OUT_DIR:-out}
mkdir -p "$OUT_DIR"

device_tests() {
  [ -n "${NO_TESTS:-}" ] && return
  local limit=$1
  shift
  date -u +"## tests %H:%M:%S"
  timeout "$limit" python3 -m pytest -q -n 12 "$@" > "$OUT_DIR/tests.log" 2>&1
  echo "## tests rc $?"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT_DIR/tests.log" | head -12 | cut -c1-300
}

engine_1000() {
  date -u +"## engine $1 %H:%M:%S"
  timeout "${ENGINE_TIMEOUT:-140}" python3 benchmarks/gpu_bench.py --out "$OUT_DIR/$1" --sections engine --parts none \
      --long --max-num-seqs 384 --long-requests 768 --kv-dtype "$2" --packed-set "$3" > "$OUT_DIR/$1.log" 2>&1
  echo "## rc $?"; grep -E '"workload": "768x1000' "$OUT_DIR/$1.log" | head -1 | cut -c1-330
}

# engine_runs DEFAULT: stdin is a table of runs, one "NAME KV SET" a line; runs those RUNS names
# (DEFAULT when RUNS is unset), in that order, with engine_1000.
engine_runs() {
  local table name kv set_ n
  table=$(cat)
  for n in ${RUNS:-$1}; do
    read -r name kv set_ <<< "$(awk -v n="$n" '$1 == n' <<< "$table")"
    if [ -z "$name" ]; then echo "## no run named $n"; continue; fi
    engine_1000 "$name" "$kv" "$set_"
  done
}
