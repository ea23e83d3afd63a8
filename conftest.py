"""Executable docs: every fenced block of README.md and docs/*.md runs under pytest (Sybil).

Why Sybil: it is maintained, collects Markdown through pytest like any test file, keeps one
namespace per document (so a later ``python`` block sees what an earlier one defined), and
its ``<!-- skip: next ... -->`` directive lets a block that cannot run here say why, next to
the block. The languages:

- ``python``: run in-process, one namespace per document.
- ``bash``: run by ``bash -euo pipefail`` from the repository root, with the venv's ``bin`` on
  ``PATH`` (as after ``. .venv/bin/activate``). A block may leave a server running in the
  background (``qkv serve ... &``); every process a document started is killed when the
  document is done.
- ``console``: ``$ command`` lines followed by the output they print; the output is compared
  as doctest does with ``ELLIPSIS`` (a ``...`` line matches anything) and normalized spaces.
- ``text`` (and blocks without a language): syntax and printed output, not run.

The test command collects these files: ``pytest tests README.md docs``.
"""

from __future__ import annotations

import doctest
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BLOCK_TIMEOUT_S = 600


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_bash(example, source: str) -> subprocess.CompletedProcess:
    # A session of its own, so that teardown can kill what the block left in the background;
    # output to a file, not a pipe, since a background server keeps its copy of the pipe open.
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(["bash", "-euo", "pipefail", "-c", source], cwd=ROOT, env=_env(),
                             stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        example.namespace.setdefault("_process_groups", []).append(p.pid)
        try:
            p.wait(timeout=BLOCK_TIMEOUT_S)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(p.pid)
            p.wait()
            timed_out = True
        log.seek(0)
        out = log.read()
    if timed_out:
        raise AssertionError(f"block ran past {BLOCK_TIMEOUT_S} s:\n{out}")
    return subprocess.CompletedProcess(p.args, p.returncode, out)


def evaluate_bash(example) -> str | None:
    r = _run_bash(example, example.parsed)
    if r.returncode:
        return f"bash block exited {r.returncode}:\n{r.stdout}"
    return None


def evaluate_console(example) -> str | None:
    """``$ cmd`` lines, each followed by its expected output."""
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    commands: list[tuple[str, list[str]]] = []
    for line in example.parsed.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
        elif line.strip():
            return f"console block must start with '$ ': {line!r}"
    for cmd, expected_lines in commands:
        r = _run_bash(example, cmd)
        if r.returncode:
            return f"`{cmd}` exited {r.returncode}:\n{r.stdout}"
        want = "\n".join(expected_lines) + "\n"
        if not checker.check_output(want, r.stdout, flags):
            return f"`{cmd}` printed something else:\n" + checker.output_difference(
                doctest.Example(cmd, want), r.stdout, flags)
    return None


def _kill(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _teardown(namespace: dict) -> None:
    groups = namespace.get("_process_groups", [])
    for pgid in groups:
        _kill(pgid)
    # Wait for them (a server drains its streams first), so the next document finds its port free.
    deadline = time.monotonic() + 30
    for pgid in groups:
        while _alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _setup(namespace: dict) -> None:
    import torch

    namespace["cuda"] = torch.cuda.is_available()


def _sybil():
    from sybil import Sybil
    from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

    return Sybil(
        parsers=[
            PythonCodeBlockParser(),
            CodeBlockParser("bash", evaluate_bash),
            CodeBlockParser("console", evaluate_console),
            SkipParser(),
        ],
        patterns=["README.md", "*.md"],
        setup=_setup,
        teardown=_teardown,
    )


try:  # the GPU machine has no sybil: there the docs are not collected, the tests still run
    import sybil  # noqa: F401
except ImportError:
    pass
else:
    pytest_collect_file = _sybil().pytest()
