"""Scheduler: which requests run this step, and how many of their tokens.

Every step has a token budget (``max_num_batched_tokens``). Running requests go first, in
admission order, each taking what it still needs (1 token when decoding, the rest of its
prompt when prefilling) up to the budget: so decodes and prefill chunks share a step, and a
long prompt is split across steps (chunked prefill). Waiting requests are then admitted in
arrival order (FCFS) while budget, ``max_num_seqs`` and blocks last; admission first looks
up the prefix cache, so the cached part of a prompt costs no budget.

With async scheduling (engine/pending.py) a running request may carry a token sampled by the
step in flight; ``Request.num_tokens`` counts it, so that request is planned as decoding it.

When the pool runs dry, the most recently admitted running request is preempted: its
blocks are freed (full ones stay in the prefix cache) and it goes back to the front of the
queue to be recomputed later. Its sampled tokens are kept, so its output does not change.

Encoder-decoder models: a request's encoder runs in the step that admits it (engine/encoder.py),
so admission charges its ``encoder_len`` (Whisper: 1500 positions) to the token budget beside its
prompt tokens. The encoder is never split; a request whose encoder exceeds what is left of the
budget waits for the next step, unless it would be the step's first admission (then it overdraws
the budget, by at most one encoder per step, rather than wait as long as others keep running
when the budget is below ``encoder_len``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qkv.engine.request import Request, Status
from qkv.kvcache.manager import KVCacheManager


class RequestTooLarge(ValueError):
    """A request that can never fit in the KV pool, or past the model's context."""


class PoolBusy(RuntimeError):
    """The free KV blocks cannot hold this now, though they could later: retry (not the input's fault)."""


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (group, src, dst) block copies

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int):
        # A zero budget or seat count would schedule nothing, forever: generate() would hang.
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) and max_num_seqs "
                             f"({max_num_seqs}) must be at least 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_hit_tokens = 0

    # ---------------------------------------------------------------- queue ops
    def add(self, req: Request) -> None:
        """Queue ``req``; reject at once what could never run."""
        total = req.max_total_tokens
        if total > self.max_model_len:
            raise RequestTooLarge(
                f"prompt ({req.num_prompt_tokens} tokens) + max_tokens ({req.params.max_tokens}) = {total} "
                f"exceeds the maximum context length of {self.max_model_len} tokens")
        if req.params.n > self.max_num_seqs:
            raise RequestTooLarge(f"n={req.params.n} samples run as {req.params.n} sequences, but "
                                  f"max_num_seqs is {self.max_num_seqs}")
        # A BART request's cross blocks are its own encoder's, not the longest one's: a short
        # input was refused by a cross pool that holds it.
        enc = req.encoder_len or None
        self.check_fits(total, enc, f"prompt + max_tokens = {total} tokens"
                                    f"{f' over {enc} encoder positions' if enc else ''} needs", "or lower max_tokens")
        self.waiting.append(req)

    def check_fits(self, num_tokens: int, encoder_len: int | None, what: str, advice: str = "") -> None:
        """RequestTooLarge, "``what`` [blocks] KV blocks, but ...", unless a sequence of
        ``num_tokens`` (over ``encoder_len`` encoder positions) fits the pool when it runs alone."""
        if not self.kv.can_ever_fit(num_tokens, encoder_len):
            need = self.kv.blocks_needed(num_tokens, encoder_len)
            have = [g.pool.num_blocks for g in self.kv.groups]
            raise RequestTooLarge(f"{what} {need} KV blocks, but the pool has only {have}; "
                                  f"raise num_kv_blocks{f' {advice}' if advice else ''}")

    def finish(self, req: Request, reason: str) -> None:
        """End ``req`` (stop, length or abort) and give back its blocks."""
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        for child in req.forks:  # siblings never forked: they end with it
            self.finish(child, reason)
        req.forks = []

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- the step
    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.pending_row is not None and req.num_tokens >= min(req.max_total_tokens, self.max_model_len):
                # Async scheduling: the token in flight ends this request by length when it is
                # read; computing past it would be waste, or past the model's context.
                i += 1
                continue
            n = self._chunk(req, budget)
            copies = self.kv.allocate(req, n)
            while copies is None:
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                copies = self.kv.allocate(req, n)
            if copies is None:
                break
            out.requests.append(req)
            out.num_new_tokens.append(n)
            out.copies += copies
            budget -= n
            i += 1

        # Admitting while others were just preempted would only thrash. A request's unforked
        # siblings (n > 1) hold seats too: they join ``running`` when its prompt is done.
        # (Counted only when someone waits: a decode-only step skips the walk over ``running``.)
        seats = len(self.running) + sum(len(r.forks) for r in self.running) if self.waiting else 0
        admitted = 0
        while self.waiting and budget > 0 and not preempted:
            req = self.waiting[0]
            if seats + 1 + len(req.forks) > self.max_num_seqs:
                break
            enc = req.encoder_len  # its encoder runs in this step: charged to the budget
            if enc and enc >= budget and admitted:
                break
            hit = self.kv.match_prefix(req)
            req.num_computed_tokens = hit
            n = self._chunk(req, max(1, budget - enc))
            copies = self.kv.allocate(req, n)
            if copies is None:
                self.kv.free(req)
                req.num_computed_tokens = 0
                if not self.running:
                    # Nothing else holds blocks: only cached ones stand in the way, and
                    # allocate() evicts those. add() and _chunk() make this unreachable.
                    raise RuntimeError(f"bug: admitted request {req.request_id} does not fit "
                                       f"in an empty KV pool ({n} new tokens)")
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                req.num_cached_tokens = hit if req.cached_cap is None else min(hit, req.cached_cap)
                self.num_prompt_tokens += req.num_prompt_tokens
                self.num_hit_tokens += req.num_cached_tokens
            req.status = Status.RUNNING
            self.running.append(req)
            seats += 1 + len(req.forks)
            admitted += 1
            out.requests.append(req)
            out.num_new_tokens.append(n)
            out.copies += copies
            budget -= n + enc
        return out

    def _chunk(self, req: Request, budget: int) -> int:
        """Tokens ``req`` computes this step: what it still needs, within the token budget and
        within what its window groups' pools hold during one step (``kv.chunk_limit``). That
        last cap is why a request ``add`` accepted always fits once the others are preempted."""
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        limit = self.kv.chunk_limit(req)
        if limit is not None and limit < 1:  # add() admits no such request; never spin on 0 tokens
            raise RuntimeError(f"bug: {req.request_id} can take no token in its window pools")
        return n if limit is None else min(n, limit)

    def preempt_newest(self) -> bool:
        """Preempt the most recently admitted running request, as a step that runs dry does
        (it is recomputed later, with the same result); False when nothing runs. Only between
        steps: the engine's prompt scoring makes room with it."""
        if not self.running:
            return False
        self._preempt(self.running.pop())
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, batch: ScheduledBatch, rows: list[int] | None = None) -> list[Request]:
        """Advance each scheduled request past its computed tokens, key its new full blocks,
        and return those whose next token is due (their logits rows are sampled); ``rows``,
        if given, receives each one's row in the step's logits.

        Requests that finished after the batch was launched (async scheduling: the token they
        were fed ended them when it was read) are skipped: their blocks are gone. Their logits
        row still counts: reading a token appends what ``num_tokens`` already counted, so
        the runner's test (fed its last token) gives the same answer now as at launch."""
        due = []
        row = 0
        finished = Status.FINISHED
        for req, n in zip(batch.requests, batch.num_new_tokens):
            fed_last = req.num_computed_tokens + n == req.num_tokens
            if req.status is not finished:
                req.num_computed_tokens += n
                self.kv.cache_blocks(req)
                if fed_last:
                    due.append(req)
                    if rows is not None:
                        rows.append(row)
            row += fed_last
        return due

    def fork(self, parent: Request, child: Request) -> None:
        """Start sibling ``child`` on ``parent``'s computed prompt blocks."""
        self.kv.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = Status.RUNNING
        self.running.append(child)

    # ---------------------------------------------------------------- stats
    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0
