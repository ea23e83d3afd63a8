"""benchmarks/device_carry.py: a file split into parts comes back whole, and a missing or
altered part is refused by name."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "device_carry", Path(__file__).parents[1] / "benchmarks" / "device_carry.py")
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)


def test_parts_join_back_and_bad_parts_are_refused(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(bytes(range(256)) * 1000 + b"tail")
    dirs = dc.split(src, tmp_path / "carry", part_bytes=100_000)
    assert [d.name for d in dirs] == ["p00", "p01", "p02"]
    stash = tmp_path / "stash"
    stash.mkdir()
    for d in dirs:
        for f in d.iterdir():
            shutil.copy(f, stash)
    dc.join(stash, tmp_path / "back.gguf")
    assert (tmp_path / "back.gguf").read_bytes() == src.read_bytes()

    (stash / "part-01").write_bytes(b"x" + (stash / "part-01").read_bytes()[1:])
    with pytest.raises(ValueError, match="part-01 of model.gguf differs"):
        dc.join(stash, tmp_path / "bad.gguf")
    (stash / "part-02").unlink()
    (stash / "part-01").write_bytes((dirs[1] / "part-01").read_bytes())
    with pytest.raises(FileNotFoundError, match="part-02 of model.gguf has not arrived"):
        dc.join(stash, tmp_path / "bad.gguf")
