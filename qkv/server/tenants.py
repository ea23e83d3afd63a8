"""API keys and the prefix-cache salt that keeps tenants apart.

The engine shares KV blocks between requests whose block keys are equal, and the key of a
request's first block includes its ``cache_salt``. A request that reuses another's blocks is
answered faster and reports ``usage.prompt_tokens_details.cached_tokens > 0``: with one
shared salt, any client could learn whether anyone else sent a given prefix. So when the
server has several API keys, each key is its own tenant: its salt is derived from the key,
and a request's salt combines that with the request's own ``cache_salt`` (vLLM's field: a
client may split its own traffic further, never join another key's).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


def read_keys(keys: list[str] | None, key_file: str | None, env: str | None = None) -> list[str]:
    """The keys from ``--api-key`` (repeatable), ``--api-key-file`` (one per line; blank lines
    and ``#`` comments skipped) and ``$QKV_API_KEY``, without duplicates, in that order.
    Raises ValueError naming the file when it cannot be read or holds no key."""
    out = [k.strip() for k in keys or [] if k.strip()]
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {key_file}: cannot read it: {e}") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"--api-key-file {key_file}: no key in it (one key per line)")
        out += found
    env = os.environ.get("QKV_API_KEY") if env is None else env
    if env and env.strip():
        out.append(env.strip())
    if any(any(c.isspace() for c in k) for k in out):
        raise ValueError("an API key must not contain whitespace")
    return list(dict.fromkeys(out))


class KeyRing:
    """The server's API keys. ``match`` finds the key of a bearer token in time that does not
    depend on which key (or how much of one) matched; ``salt`` is that key's tenant salt."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        # One key is one tenant: no salt, so the prefix cache behaves as without a key.
        self._salts = [_tenant_salt(k) if len(keys) > 1 else None for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, token: str) -> int | None:
        """The index of the key ``token`` is, or None."""
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found = None
        for i, d in enumerate(self._digests):  # no early exit: every key is compared
            if secrets.compare_digest(digest, d):
                found = i
        return found

    def salt(self, index: int | None) -> str | None:
        return None if index is None else self._salts[index]


def _tenant_salt(key: str) -> str:
    return hashlib.sha256(b"qkv-tenant\0" + key.encode()).hexdigest()


def request_salt(tenant: str | None, cache_salt: str | None) -> str | None:
    """The salt the engine gets. Without tenants, the request's own ``cache_salt`` as given
    (vLLM's behaviour); with one, a hash of both, so no ``cache_salt`` can name another
    tenant's salt."""
    if tenant is None:
        return cache_salt
    return hashlib.sha256(f"{tenant}\0{cache_salt or ''}".encode("utf-8")).hexdigest()
