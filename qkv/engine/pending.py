"""PendingTokens: the tokens a step sampled on the device that the host has not read yet.

Async scheduling (LLMEngine ``async_scheduling=True``) launches step n+1 before the host
reads step n's tokens, so that the host work of one step overlaps the device work of the
previous one (vLLM v1 does the same). Between ``push`` (step n sampled) and ``pop`` (after
step n+1 is launched) every request sampled at step n carries ``pending_row``: its next token
is row ``pending_row`` of ``tokens``. ``Request.num_tokens`` counts that token, so the scheduler
plans step n+1 as if it were known; the runner gathers it on the device as that request's
input id. With async scheduling off, ``pop`` follows ``push`` at once and nothing is ever
pending across a step boundary.

Contract: ``push`` takes the sampled tensor (the device keeps it alive until the gathers of
the next step are enqueued, which happens before ``pop``); ``pop`` waits only for the copy of
these tokens to the host, never for work launched after them, clears ``pending_row`` on
every request it returns, and leaves this object empty. ``drop_finished`` (after an abort
between steps) forgets requests that will never need their token, so that an engine whose
requests were all aborted has nothing left in flight.
"""

from __future__ import annotations

import torch

from qkv.engine.request import Request


class PendingTokens:
    def __init__(self, device: torch.device):
        self.device = device
        self.requests: list[Request] = []  # each reads row ``pending_row`` of ``tokens``
        self.tokens: torch.Tensor | None = None  # [rows pushed] int64 on the device
        self._logprobs: tuple | None = None  # (sampled lp [N], rank [N], top lps [N,k], top ids [N,k])
        self._host: torch.Tensor | None = None  # pinned copy target on CUDA, reused every step
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def __bool__(self) -> bool:
        return bool(self.requests)

    def push(self, tokens: torch.Tensor, requests: list[Request], logprobs: tuple | None = None) -> None:
        """Hold step n's sampled ``tokens`` (one per request, in order) and start their copy
        to the host. The previous step's tokens must have been popped. ``logprobs``: device
        tensors with one row per request (sampled token's log-probability, its rank, top-k
        values, top-k ids), copied along with the tokens."""
        assert not self.requests, "the previous step's tokens were never read"
        for row, req in enumerate(requests):
            req.pending_row = row
        self.requests, self.tokens = list(requests), tokens
        self._logprobs = logprobs
        if self._copied is not None:
            if logprobs is not None:  # non_blocking to the CPU lands in pinned memory
                self._logprobs = tuple(t.to("cpu", non_blocking=True) for t in logprobs)
            n = tokens.numel()
            if self._host is None or self._host.numel() < n:
                self._host = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
            self._host[:n].copy_(tokens, non_blocking=True)
            # Recorded before the next step is launched: waiting on it never waits for that step.
            self._copied.record()

    def pop(self) -> list[tuple[Request, int, tuple | None]]:
        """Read the held tokens on the host: (request, token, logprobs) in push order, where
        logprobs is (logprob, rank, top logprobs, top ids) as Python values when pushed, else
        None. Requests that finished since (aborted) may be among them; the caller skips those."""
        if not self.requests:
            return []
        if self._copied is not None:
            self._copied.synchronize()
            values = self._host[:self.tokens.numel()].tolist()
        else:
            values = self.tokens.tolist()
        lps = [t.tolist() for t in self._logprobs] if self._logprobs is not None else None
        triples = [(req, values[req.pending_row], None if lps is None else tuple(x[req.pending_row] for x in lps))
                   for req in self.requests]
        for req in self.requests:
            req.pending_row = None
        self.requests, self.tokens, self._logprobs = [], None, None
        return triples

    def drop_finished(self) -> None:
        """Forget finished (aborted) requests: their tokens are never read."""
        live = []
        for req in self.requests:
            if req.finished:
                req.pending_row = None
            else:
                live.append(req)
        self.requests = live
        if not live:
            self.tokens = self._logprobs = None
