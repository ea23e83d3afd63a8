"""Carry a file larger than one device call may take (64 MiB) in parts, over calls on one warm machine.

    python benchmarks/device_carry.py split FILE build/carry --part-mb 60   # here: build/carry/p00/, p01/, ...
    # device call i (back to back: a machine goes back after 30 s idle), carry ["build/carry/pNN"]:
    #   mkdir -p /tmp/stash && cp build/carry/pNN/* /tmp/stash/
    python benchmarks/device_carry.py join /tmp/stash /tmp/model.gguf      # there, in the last call

``split`` writes each part in a folder of its own (one ``carry`` path per call) and a
``manifest.json`` (name, size, SHA-256 of the whole file and of each part) into the first;
``join`` checks every part and the whole against it and refuses a missing or altered part by
name. SmolLM2's 98 MB GGUF travelled this way in two calls (docs/memory.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(src: Path, out: Path, part_bytes: int) -> list[Path]:
    data = src.read_bytes()
    parts = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)] or [b""]
    dirs = []
    for i, chunk in enumerate(parts):
        d = out / f"p{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"part-{i:02d}").write_bytes(chunk)
        dirs.append(d)
    manifest = {"name": src.name, "size": len(data), "sha256": _sha(data),
                "parts": [{"file": f"part-{i:02d}", "size": len(c), "sha256": _sha(c)} for i, c in enumerate(parts)]}
    (dirs[0] / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dirs


def join(stash: Path, dst: Path) -> None:
    manifest = json.loads((stash / "manifest.json").read_text())
    with open(dst, "wb") as f:
        for p in manifest["parts"]:
            path = stash / p["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{p['file']} of {manifest['name']} has not arrived in {stash}")
            chunk = path.read_bytes()
            if len(chunk) != p["size"] or _sha(chunk) != p["sha256"]:
                raise ValueError(f"{p['file']} of {manifest['name']} differs from the one split")
            f.write(chunk)
    whole = hashlib.sha256(dst.read_bytes()).hexdigest()
    if whole != manifest["sha256"]:
        raise ValueError(f"{dst}: SHA-256 {whole} is not {manifest['name']}'s {manifest['sha256']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("file", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--part-mb", type=float, default=60.0)
    j = sub.add_parser("join")
    j.add_argument("stash", type=Path)
    j.add_argument("dst", type=Path)
    a = p.parse_args()
    try:
        if a.cmd == "split":
            for d in split(a.file, a.out, int(a.part_mb * 2**20)):
                print(d)
        else:
            join(a.stash, a.dst)
            print(f"{a.dst}: whole and checked")
    except (OSError, ValueError) as e:
        print(f"device_carry: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
