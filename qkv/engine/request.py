"""Request, SamplingParams and RequestOutput: what flows into and out of the engine."""

from __future__ import annotations

import enum
import itertools
import math
import numbers
import time
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` is greedy.

    With ``n > 1`` the samples share the prompt's KV blocks; sample ``i`` draws from
    ``seed + i``, so it equals a single request with that seed.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        """Validate every field; a wrong type or range is a ValueError naming the field."""
        self.n = _int("n", self.n, low=1)
        self.max_tokens = _int("max_tokens", self.max_tokens, low=1)
        self.temperature = _real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _int("top_k", self.top_k, low=-1)
        if self.seed is not None:
            # Sample i draws from seed + i; torch generators take seeds in [-2**63, 2**64).
            self.seed = _int("seed", self.seed, low=-(1 << 63))
            if self.seed + self.n - 1 >= 1 << 64:
                raise ValueError(f"seed must be below 2**64 - n + 1 (sample i uses seed + i), got {self.seed}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(stop)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
        self.stop_token_ids = [_int("stop_token_ids", t, low=0) for t in ids]
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _int(name: str, v, low: int) -> int:
    """``v`` as an int >= ``low``; numpy ints count, bools and floats (even 2.0) do not."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < low:
        raise ValueError(f"{name} must be at least {low}, got {v}")
    return int(v)


def _real(name: str, v) -> float:
    """``v`` as a finite float: nan or inf would make every probability nan."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return float(v)


@dataclass
class RequestOutput:
    """One sample's state after a step. The token lists are views of the request's own
    append-only list cut at this step's length, so making one per token costs O(1)."""

    request_id: str
    _all_token_ids: list[int] = field(repr=False)
    num_prompt_tokens: int
    num_tokens: int
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    num_cached_tokens: int = 0
    index: int = 0  # which of the n samples
    text_delta: str = ""  # text added by this step (streaming)
    samples: list["RequestOutput"] = field(default_factory=list)  # all n samples when n > 1

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._all_token_ids[:self.num_prompt_tokens]

    @property
    def token_ids(self) -> list[int]:
        return self._all_token_ids[self.num_prompt_tokens:self.num_tokens]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Request:
    """One sequence being generated. The scheduler moves it between queues; the cache
    manager owns its block tables (keyed by ``request_id``)."""

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 cache_salt: str | None = None, index: int = 0, seed: int | None = None):
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        self.request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        # One growing list (prompt, then outputs): the cache manager hashes it block by block.
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.cache_salt = cache_salt
        self.index = index
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.finish_reason: str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.text = ""  # detokenized output, kept by the engine for stop strings
        self.seed = seed if seed is not None else params.seed
        self.generator: torch.Generator | None = None  # made by the sampler on its device
        # Parallel sampling: siblings wait here until this request's prompt is computed, then
        # share its blocks (KVCacheManager.fork) and sample from the same logits row.
        self.forks: list[Request] = []
        self.num_preemptions = 0
        # Async scheduling: this request's next token was sampled by the step in flight and is
        # row ``pending_row`` of its device tensor (engine/pending.py). ``num_tokens`` counts it,
        # ``all_token_ids`` will hold it once the host has read it.
        self.pending_row: int | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, a pending one (sampled, not yet read on the host) included."""
        return len(self.all_token_ids) + (self.pending_row is not None)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens known on the host (a pending one excluded)."""
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")
