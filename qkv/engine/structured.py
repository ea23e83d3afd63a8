"""Structured outputs: JSON (schema or any object), regex, choice and grammar constraints.

``StructuredOutputs`` says what a request's output must match (exactly one kind). The
engine compiles it once per distinct constraint (``GrammarCache``: llguidance grammars,
validated, kept pristine; each request gets a cheap copy), gives each sample its own
``StructuredMatcher``, and every step:

* ``apply_masks(logits, reqs)`` masks the tokens the grammar forbids in every structured row
  (the bitmask is filled on the host by llguidance, then one ``masked_fill`` on the logits'
  device; rows of plain requests are all-ones, so the batch takes one op);
* ``StructuredMatcher.advance(token)`` (from ``LLMEngine._append``) moves the grammar on, and
  reports "stop" once it is complete (nothing but end-of-sequence could follow), so the
  request ends there with finish_reason "stop" and no eos token in the text.

A request's own options can leave its grammar no token to take (``allowed_token_ids`` that
the grammar forbids all of). Where that shows at the first token, ``GrammarCache.check_allowed``
refuses the request at admission (ValueError naming both fields: a 400 on the server). Later
in the output the sampler still draws from an all -inf row; the engine then asks the grammar
first (``advance`` returns ``DEAD_END``), drops that token (it never reaches the output's
tokens, text or logprobs) and ends the request with finish_reason ``DEAD_END`` ("error", as
vLLM names a request ended by a failure rather than by stop, length or the client's abort):
the text is the grammar-valid prefix written so far.

``min_tokens`` bans the end of sequence, but a grammar can be complete (nothing may follow)
sooner. Where that is sure at admission (a ``choice`` whose longest string has fewer bytes
than min_tokens), the request is refused naming both fields. Otherwise the output ends where
the grammar completes, with finish_reason ``DEAD_END``, not "stop": "stop" would say the
request's min_tokens was met.

Nothing here runs for a batch without a structured request (the engine checks a set first).
With async scheduling the mask is still exact: ``LLMEngine.step`` reads step n's tokens (and
advances the matchers) before it samples step n+1, and the mask is filled while the device
computes step n+1's forward pass.

Why llguidance (not xgrammar), measured on SmolLM2's 49,152-token vocabulary, CPU
(benchmarks/bench_structured.py, docs/benchmarks.md): llguidance compiles a schema in ~1 ms
against xgrammar's 13-56 ms, and masks a token in a median ~30 us against ~6 us. The mask
runs on the host overlapped with the forward pass, while a compile is paid by every new
schema before its request starts; and llguidance is one dependency-free wheel that reads a
``tokenizers`` JSON directly, where xgrammar pulls torch, transformers and triton.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from qkv.engine.request import Request
    from qkv.loading.tokenizer import Tokenizer

log = logging.getLogger(__name__)

KINDS = ("json", "regex", "choice", "grammar", "json_object")

# The finish_reason of a request whose grammar rejected every token it could sample.
DEAD_END = "error"

# JSON is written with fixed separators (as Python's json.dumps writes it), not arbitrary
# whitespace: a model (a small or a random one above all) that may emit whitespace between
# any two tokens can loop on it until max_tokens. A schema's own "x-guidance" overrides these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("structured outputs need the llguidance package: pip install 'qkv[structured]' "
                          "(or pip install llguidance)") from None
    return llguidance


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled; ``kind`` is the StructuredOutputs field at fault."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"structured_outputs.{kind}: {message}")
        self.kind, self.reason = kind, message


@dataclass
class StructuredOutputs:
    """What the output must match; exactly one field set (vLLM's StructuredOutputsParams names).

    ``json``: a JSON schema (a dict, or its JSON text); ``regex``: the whole output fullmatches
    it; ``choice``: the output is one of these strings; ``grammar``: a Lark or GBNF grammar
    (llguidance's syntax); ``json_object``: any JSON object. Raises ValueError naming the field
    when none or several are set or a value has the wrong type. Whether the schema, regex or
    grammar compiles is checked when a request uses it (``GrammarCache.compile``)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")
        given = [k for k in KINDS if (getattr(self, k) is not None if k != "json_object" else self.json_object)]
        if len(given) != 1:
            raise ValueError("structured_outputs: set exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(given) if given else 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object or its JSON text), "
                             f"got {type(self.json).__name__}")
        for k in ("regex", "grammar"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"structured_outputs.{k} must be a string, got {type(v).__name__}")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("structured_outputs.grammar must not be empty")
        if self.choice is not None:
            if isinstance(self.choice, tuple):
                self.choice = list(self.choice)
            if not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "StructuredOutputs":
        """From vLLM's wire shape ``{"json": {...}}``; an unknown key is a ValueError naming it."""
        unknown = [k for k in d if k not in KINDS]
        if unknown:
            raise ValueError(f"structured_outputs.{unknown[0]}: not supported by qkv (use one of {', '.join(KINDS)})")
        return cls(**d)

    def max_tokens_bound(self) -> int | None:
        """An upper bound on the tokens of any output this allows, where one is cheap to know
        (``choice``: its longest string's UTF-8 bytes, as every token holds at least one byte);
        None otherwise."""
        return max(len(c.encode()) for c in self.choice) if self.choice is not None else None

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if (getattr(self, k) is not None if k != "json_object" else self.json_object))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal constraints share one compiled grammar."""
        kind = self.kind
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise StructuredOutputError("json", f"not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise StructuredOutputError("json", f"a JSON schema is an object, got {type(schema).__name__}")
            # Key order kept: properties are written in the schema's order.
            return kind, json.dumps(schema)
        if kind == "choice":
            return kind, json.dumps(self.choice)
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)


class StructuredMatcher:
    """One sample's position in its grammar. Owned by its Request (``req.structured``); the
    engine thread alone calls it."""

    def __init__(self, matcher, kind: str):
        self.matcher, self.kind = matcher, kind

    def advance(self, token: int) -> str | None:
        """Accept the sampled ``token``: "stop" when the grammar is now complete, ``DEAD_END`` if
        the grammar rejects it (only possible when other options, e.g. allowed_token_ids, masked
        every token it allowed: the caller drops the token and ends the request), else None."""
        m = self.matcher
        if not m.consume_token(token):
            log.warning("structured output (%s) rejected token %d: the request's other options left its "
                        "grammar no token to take: %s", self.kind, token, m.get_error()[:500])
            return DEAD_END
        return "stop" if m.is_stopped() else None


class GrammarCache:
    """Compiled grammars of one engine's tokenizer, least recently used dropped past
    ``max_entries``. Thread-safe: the server compiles in request handlers (a bad schema is a
    400 there, off the engine thread) and the engine takes per-request copies."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, eos_token_ids: list[int], max_entries: int = 256):
        self._tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._ll_tokenizer = None  # built on first use: ~0.5 s for a 49k vocabulary
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._executor = None
        # Tokens the grammar library knows: ids past the tokenizer's (the model's padded rows)
        # are never allowed; ids past the model's (if any) are cut off the mask.
        self.mask_vocab = max(vocab_size, tokenizer.vocab_size)
        self.mask_words = (self.mask_vocab + 31) // 32

    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                llg = _llguidance()
                self._ll_tokenizer = llg.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self.mask_vocab,
                                                     eos_token=self.eos_token_ids or None)
            return self._ll_tokenizer

    def compile(self, so: StructuredOutputs):
        """The pristine llguidance matcher of ``so``'s grammar (cached). Raises
        StructuredOutputError naming the field when the schema, regex or grammar is invalid."""
        key = so.key()
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
        lt = self.ll_tokenizer()
        llg = _llguidance()
        kind, text = key
        try:
            if kind == "json":
                grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            elif kind == "json_object":
                grammar = llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            else:  # regex, choice (a Lark alternation of JSON string literals), grammar (Lark or GBNF)
                grammar = llg.grammar_from(kind, so.choice if kind == "choice" else text)
        except ValueError as e:
            raise StructuredOutputError(kind, str(e)) from None
        err = llg.LLMatcher.validate_grammar(grammar, lt)
        if err:
            raise StructuredOutputError(kind, err.strip().splitlines()[0] if kind != "grammar" else err.strip())
        matcher = llg.LLMatcher(lt, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(kind, matcher.get_error().strip())
        # A regex such as [^\s\S] compiles but matches nothing: its first mask allows only the
        # end of sequence, which would end the request at once with "" and "stop".
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_stopped() and not probe.is_accepting():
            raise StructuredOutputError(kind, "matches no output at all, not even an empty one")
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, so: StructuredOutputs) -> StructuredMatcher:
        """A fresh matcher for one sample (a copy of the compiled one: ~20 us, not ~1 ms)."""
        compiled = self.compile(so)
        with self._lock:
            return StructuredMatcher(compiled.deep_copy(), so.kind)

    def check_allowed(self, so: StructuredOutputs, allowed_token_ids: list[int], field: str | None = None) -> None:
        """ValueError (naming ``allowed_token_ids`` and ``field``, by default
        ``structured_outputs.<kind>``) when none of ``allowed_token_ids`` may begin the output
        that ``so``'s grammar requires: such a request could only end at once with nothing."""
        compiled = self.compile(so)
        with self._lock:
            first = compiled.deep_copy()
        mask = np.frombuffer(first.compute_bitmask(), dtype=np.uint8)
        ids = np.asarray(allowed_token_ids, dtype=np.int64)
        ids = ids[ids < self.mask_vocab]
        if not ((mask[ids >> 3] >> (ids & 7)) & 1).any():
            raise ValueError(f"allowed_token_ids: none of these tokens may begin the output that "
                             f"{field or 'structured_outputs.' + so.kind} requires; allow at least one "
                             f"token that the grammar allows first")

    def executor(self):
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        return self._executor


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_masks(logits: torch.Tensor, reqs: list["Request"], cache: GrammarCache) -> torch.Tensor:
    """logits [N, V], one row per request -> logits with every token that a structured row's
    grammar forbids at -inf (a new tensor; ``logits`` itself when no row is structured).

    The host fills an int32 bitmask [N, words] (plain rows all ones, structured rows in
    parallel by llguidance's executor); the device applies it with one ``masked_fill``. On
    CUDA the packed bitmask (V/8 bytes a row) goes over in pinned memory and is unpacked
    there; on the CPU numpy unpacks it."""
    rows = [(r.structured.matcher, i) for i, r in enumerate(reqs) if r.structured is not None]
    if not rows:
        return logits
    n, V = logits.shape
    cuda = logits.is_cuda
    words = cache.mask_words
    host = torch.full((n, words), -1, dtype=torch.int32, pin_memory=cuda)
    cache.executor().unsafe_compute_mask_ptr(rows, host.data_ptr(), words * 4, n)
    allowed = unpack_on_device(host.to(logits.device, non_blocking=True), V) if cuda else unpack_on_host(host, V)
    return logits.masked_fill(allowed.logical_not_(), float("-inf"))


def unpack_on_host(bitmask: torch.Tensor, V: int) -> torch.Tensor:
    """int32 [n, words] (bit k of word j: token 32j + k) -> bool [n, V], by numpy."""
    unpacked = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(unpacked[:, :V]).bool()


def unpack_on_device(bitmask: torch.Tensor, V: int) -> torch.Tensor:
    """The same on ``bitmask``'s device (CUDA: the packed mask is 1/8 of the bytes to copy)."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    n, words = bitmask.shape
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).view(n, words * 32)[:, :V].bool()
