"""Request, SamplingParams and RequestOutput: what flows into and out of the engine."""

from __future__ import annotations

import enum
import itertools
import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from qkv.engine.structured import StructuredOutputs


GREEDY_BELOW = 1e-5  # a temperature below this is greedy


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` (or below 1e-5) is greedy.

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
    # vLLM's logits processors (engine/processors.py), with vLLM's names and semantics.
    presence_penalty: float = 0.0  # minus this for every token already in the output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # HF/CTRL: prompt and output tokens' logits / p if > 0, else * p
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    min_tokens: int = 0  # eos and stop_token_ids cannot end the output before this many tokens
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits
    bad_words: list[str] | None = None  # words never generated (each tokenization's last token banned)
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    # Whisper's decoding rules (set by LLM.transcribe from the model's generation config; not on
    # the OpenAI API): these tokens are never sampled, and these not as the first output token.
    suppress_token_ids: list[int] | None = None
    begin_suppress_token_ids: list[int] | None = None
    # Log-probabilities of the model's own distribution (before any processor or temperature).
    logprobs: int | None = None  # per output token: the sampled token's and the top ``logprobs``
    prompt_logprobs: int | None = None  # per prompt token (the first has none)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # The output must match a JSON schema, regex, choice or grammar (engine/structured.py).
    structured_outputs: StructuredOutputs | None = None

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
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = _real(name, getattr(self, name))
            if not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
            setattr(self, name, v)
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.min_p = _real("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.min_tokens = _int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            digits = lambda k: isinstance(k, str) and k.isascii() and k.isdigit()  # noqa: E731 ("²" is a digit)
            self.logit_bias = {_int("logit_bias (a token id)", int(k) if digits(k) else k,
                                    low=0): _real("logit_bias (a bias)", v) for k, v in self.logit_bias.items()}
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
            self.bad_words = list(words)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {ids!r}")
            # Without repeats: each step's work is one entry per id (400k repeats of one id cost 0.1 s a step).
            self.allowed_token_ids = list(dict.fromkeys(_int("allowed_token_ids", t, low=0) for t in ids))
        for name in ("suppress_token_ids", "begin_suppress_token_ids"):
            ids = getattr(self, name)
            if ids is not None:
                if not isinstance(ids, (list, tuple)):
                    raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
                setattr(self, name, [_int(name, t, low=0) for t in ids] or None)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _int(name, getattr(self, name), low=0))
        if isinstance(self.structured_outputs, dict):  # vLLM's wire shape: {"json": {...}}
            self.structured_outputs = StructuredOutputs.from_dict(self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise ValueError(f"structured_outputs must be a StructuredOutputs, got {self.structured_outputs!r}")

    @property
    def greedy(self) -> bool:
        # As vLLM's: below 1e-5 is greedy. logits / 1e-39 overflows float32 (inf - inf = nan):
        # such a temperature drew garbage instead of the near-greedy token.
        return self.temperature < GREEDY_BELOW

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor applies (requests without one pay nothing for them)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_p or self.min_tokens or self.logit_bias or self.bad_words
                    or self.allowed_token_ids is not None or bool(self.suppress_token_ids)
                    or bool(self.begin_suppress_token_ids))


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
class Logprob:
    """vLLM's shape: a token's log-probability under the model, its rank (1 = most likely)
    and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample, as vLLM's ``RequestOutput.outputs[i]``."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None  # per token: the sampled token first, then the top-k
    finish_reason: str | None


@dataclass
class RequestOutput:
    """One sample's state after a step. The token lists are views of the request's own
    append-only list cut at this step's length, so making one per token costs O(1)."""

    request_id: str
    _all_token_ids: list[int] = field(repr=False)
    num_prompt_tokens: int
    num_tokens: int
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (a grammar's dead end) | None while running
    num_cached_tokens: int = 0
    index: int = 0  # which of the n samples
    text_delta: str = ""  # text added by this step (streaming)
    samples: list["RequestOutput"] = field(default_factory=list)  # all n samples when n > 1
    _logprobs: list | None = field(default=None, repr=False)  # the request's own list, cut below
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # first entry None
    cumulative_logprob: float | None = None
    prompt: str | None = None  # the prompt's text, when it was given as text

    @property
    def logprobs(self) -> list[dict[int, Logprob]] | None:
        """Per output token: {token id: Logprob}, the sampled token first (None unless asked)."""
        if self._logprobs is None:
            return None
        return self._logprobs[:self.num_tokens - self.num_prompt_tokens]

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's view: one CompletionOutput per sample (``n`` of them)."""
        return [CompletionOutput(s.index, s.text, s.token_ids, s.cumulative_logprob, s.logprobs, s.finish_reason)
                for s in (self.samples or [self])]

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
        # At most this many of them are reported as cached (None: no cap): a request whose
        # prompt_logprobs pass computed (and so cached) its own prompt found no more than this.
        self.cached_cap: int | None = None
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
        # Logprobs (params.logprobs set): one {token: Logprob} per output token.
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: list | None = None
        # Set by the engine at admission: token ids banned while output < min_tokens, and
        # bad_words as token id sequences.
        self.min_tokens_ids: list[int] = []
        self.bad_words_ids: list[list[int]] = []
        # Set by the engine at admission when params.structured_outputs is: this sample's own
        # grammar state (engine/structured.py), advanced in LLMEngine._append.
        self.structured = None
        # Encoder-decoder models (engine/encoder.py): the encoder's input (Whisper: log-mel
        # [mels, frames]) and its output length, set by the engine; kept until the request ends
        # because a preempted request runs its encoder again.
        self.encoder_features: torch.Tensor | None = None
        self.encoder_len = 0

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
