#!/bin/bash
# Issue 23, --api-server-count: the H200 closed-loop comparison of 1 and 4 front-end processes
# (docs/benchmarks.md's "qkv serve against the offline engine" workload), one device call:
#   OUT=dir bash benchmarks/serve_frontends_device_run.sh        # COUNTS="1 4" by default
# EXTRA adds options to each `qkv bench serve` (e.g. EXTRA="--loop-hangup 0.25").
# Run it from a directory holding qkv/, smollm2-tok/ (SmolLM2's tokenizer.json and
# tokenizer_config.json) and .whl/: the device image lacks fastapi, starlette, pydantic,
# pydantic-core, annotated-types, annotated-doc, typing-extensions, typing-inspection,
# python-multipart, uvicorn and pyzmq (it has msgpack, h11, uvloop, httpx, prometheus-client);
# /work/.library/device/README.md says how to download cp312 manylinux wheels.
set -o pipefail
: "${OUT:=/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
nproc | tee -a "$OUT/card.txt"
for n in ${COUNTS:-1 4}; do
  timeout "${LIMIT:-270}" python3 -c 'import sys; from qkv.cli import main; sys.exit(main())' bench serve \
    --random-weights llama3.2-1b --model smollm2-tok --max-num-seqs 128 \
    --closed-loop 128 --loop-requests 512 --client-procs 8 \
    --rates 64 --num-requests 256 --input-len 512 --output-len 128 \
    --api-server-count "$n" $EXTRA --json "$OUT/n$n.json" > "$OUT/n$n.log" 2>&1
  echo "api-server-count $n: rc=$?" | tee -a "$OUT/n$n.log"
  grep -v '^\[qkv\]' "$OUT/n$n.log" | tail -24
done
