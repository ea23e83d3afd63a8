"""Run a script in a fresh Python without Triton's interpreter: tests that build sm_90 cubins
(ptxas, no GPU needed) from modules whose test files switch the interpreter on for their own
process (``TRITON_INTERPRET`` is read when triton is first imported)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_uninterpreted(script: str, timeout: int = 900) -> list[str]:
    """``script``'s stdout, split into words; fails the test with its stderr's tail if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()
