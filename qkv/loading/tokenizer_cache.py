"""A GGUF's tokenizer, built once: the tokenizers library's own JSON of it, cached.

A SentencePiece GGUF vocabulary has no merges: they are rebuilt from the token scores in
Python, ~20 s for Gemma 3's 262k tokens (load average 8), every time the model loads. The
built tokenizer is saved as the library's
``tokenizer.json`` under ``cache_dir()/tokenizers`` (``QKV_CACHE_DIR``, else
``~/.cache/qkv``), keyed by the GGUF file (resolved path, size, modification time), the code
that built it (qkv/loading/gguf.py) and the tokenizers version; later loads read it back.
The cache can only make a load faster, never make it fail or differ: a directory that cannot
be written, or a file that cannot be read, means the tokenizer is built as before. Reading
it back took 7.9 s instead of 24 s for Gemma 3 (the same machine, minutes apart); for a
byte-level vocabulary, whose merges are in the file, building is faster than reading
(gguf.py caches only the first kind).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .models import cache_dir


def key(path: str) -> str | None:
    """The cache key of the GGUF at ``path`` (None: not a file, nothing to key on)."""
    import tokenizers

    try:
        f = Path(path).resolve()
        st = f.stat()
        code = (Path(__file__).parent / "gguf.py").read_bytes()
    except OSError:
        return None
    h = hashlib.sha256(f"{f}|{st.st_size}|{st.st_mtime_ns}|{tokenizers.__version__}|".encode())
    h.update(code)
    return h.hexdigest()[:32]


def cached(path: str, build: Callable):
    """The tokenizer of the GGUF at ``path``: read from the cache, else ``build()`` and saved."""
    from tokenizers import Tokenizer

    k = key(path)
    if k is None:
        return build()
    f = cache_dir() / "tokenizers" / f"{k}.json"
    if f.is_file():
        try:
            return Tokenizer.from_file(str(f))
        except Exception:  # a corrupt or foreign file: build, and replace it below
            pass
    backend = build()
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f.name, suffix=".tmp")
        os.close(fd)
        try:
            backend.save(tmp)
            os.replace(tmp, f)  # readers never see a half-written file
        finally:
            Path(tmp).unlink(missing_ok=True)
    except Exception:  # read-only home, full disk, ...: the cache is optional
        pass
    return backend
