"""Prefix-cache keys: a SHA-256 chain over full blocks of token ids.

A block's key covers its parent's key, so equal keys mean equal whole prefixes, not
only equal blocks. ``cache_salt`` enters the first block's key, which separates tenants:
two salts never share a block.
"""

from __future__ import annotations

import hashlib
import struct


def block_key(parent: bytes | None, token_ids: list[int] | tuple[int, ...], salt: str | None = None) -> bytes:
    h = hashlib.sha256()
    if parent is None:
        h.update(b"root")
        if salt:
            h.update(salt.encode())
    else:
        h.update(parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def chain_keys(token_ids: list[int], block_size: int, salt: str | None = None, start: int = 0,
               parent: bytes | None = None) -> list[bytes]:
    """Keys of the full blocks of ``token_ids`` from block index ``start`` on;
    ``parent`` is the key of block ``start - 1`` (None when start is 0)."""
    keys = []
    for i in range(start, len(token_ids) // block_size):
        parent = block_key(parent, token_ids[i * block_size:(i + 1) * block_size], salt)
        keys.append(parent)
    return keys
