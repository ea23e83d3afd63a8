"""EngineCore: the engine process's busy loop. It schedules and steps; it never waits on HTTP.

Each turn it takes every command the front end has sent (non-blocking while there is work),
applies them, runs one ``engine.step()`` and sends all of that step's outputs to the front end
in one message (wire.py). Idle, it blocks on the command socket, waking every second to check
that its parent is still alive. The engine runs with ``detokenize = False``: outputs are token
ids, and the front end turns them into text and matches stop strings (docs/architecture.md);
a matched stop string comes back as a ``finish`` command for that sample.

Bookkeeping: ``live`` maps each submission's head id to its samples still running in the
engine, so ``abort`` and ``finish`` touch only what is live and nothing outlives its request.
"""

from __future__ import annotations

import logging
import os
import time

from qkv.engine.scheduler import RequestTooLarge
from qkv.server import wire

log = logging.getLogger("qkv.engine_core")


class EngineCore:
    def __init__(self, engine, in_addr: str, out_addr: str, parent_pid: int | None = None):
        self.engine = engine
        engine.detokenize = False
        self.in_addr, self.out_addr, self.parent_pid = in_addr, out_addr, parent_pid
        self.live: dict[str, set[str]] = {}  # head id -> sample ids still running in the engine
        self.owner: dict[str, str] = {}  # sample id -> head id
        self.want_prompt_lps: set[str] = set()  # samples whose first output carries prompt logprobs
        self.stopping = False

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        import zmq

        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.connect(self.in_addr)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(self.out_addr)
        self._send = lambda msg, pack=wire.packer(): push.send(pack(msg), copy=False)
        engine = self.engine
        last_stats, last_parent_check, dirty = 0.0, time.monotonic(), True
        try:
            while not self.stopping:
                if not engine.has_unfinished():
                    if dirty:  # idle now: let /metrics see the final state (blocks freed, ...)
                        self._send(["out", [], self._waiting(), engine.stats()])
                        dirty = False
                    if not pull.poll(1000):
                        self._check_parent()
                        continue
                while True:  # every command that has arrived, without waiting
                    try:
                        msg = pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._apply(wire.unpack(msg))
                    dirty = True
                if self.stopping:
                    break
                if not engine.has_unfinished():
                    continue
                dirty = True
                try:
                    outputs = engine.step()
                except Exception as e:  # a bug or a pool too small: fail what runs, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"{type(e).__name__}: {e}")
                    continue
                now = time.monotonic()
                stats = None
                if now - last_stats >= wire.STATS_EVERY_S:
                    stats, last_stats = engine.stats(), now
                if outputs or stats is not None:
                    self._send(["out", self._entries(outputs), self._waiting(), stats])
                if now - last_parent_check >= 1.0:
                    last_parent_check = now
                    self._check_parent()
        finally:
            for head in list(self.live):
                engine.abort(head)
            push.close()
            pull.close(linger=0)
            ctx.term()

    def _check_parent(self) -> None:
        """Exit when the parent is gone (PDEATHSIG covers Linux; this covers the rest)."""
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.error("the server process %d is gone: the engine exits", self.parent_pid)
            os._exit(1)

    def _waiting(self) -> int:
        # Unforked siblings wait with their head: n=4 waits as 4 sequences.
        return sum(1 + len(r.forks) for r in self.engine.scheduler.waiting)

    # ---------------------------------------------------------------- commands
    def _apply(self, msg: list) -> None:
        kind = msg[0]
        if kind == "add":
            self._add(*msg[1:])
        elif kind == "abort":
            for head in msg[1]:
                samples = self.live.pop(head, None)
                if samples is not None:
                    self.engine.abort(head)
                    self._forget(samples)
        elif kind == "finish":
            for sid in msg[1]:
                head = self.owner.get(sid)
                samples = self.live.get(head) if head is not None else None
                if samples is not None and sid in samples:
                    self.engine.finish(sid)
                    self._sample_done(head, sid)
        elif kind == "shutdown":
            self.stopping = True
        else:
            log.error("unknown command %r", kind)

    def _add(self, heads: list[str], prompts: list[list[int]], params: dict, salt, features) -> None:
        added: list[str] = []
        try:
            p = wire.params_from_wire(params)
            for rid, ids, feats in zip(heads, prompts, features or [None] * len(prompts)):
                reqs = self.engine.add_request(ids, p, request_id=rid, cache_salt=salt,
                                               encoder_features=wire.tensor_from_wire(feats))
                added.append(rid)
                self.live[rid] = {r.request_id for r in reqs}
                for r in reqs:
                    self.owner[r.request_id] = rid
                    if p.prompt_logprobs is not None:
                        self.want_prompt_lps.add(r.request_id)
        except Exception as e:  # ValueError for a request that can never run: nothing stays queued
            for rid in added:
                self.engine.abort(rid)
                self._forget(self.live.pop(rid))
            kind = "RequestTooLarge" if isinstance(e, RequestTooLarge) else \
                "ValueError" if isinstance(e, ValueError) else type(e).__name__
            self._send(["added", heads[0], [kind, str(e)]])
            return
        self._send(["added", heads[0], None])

    def _forget(self, samples: set[str]) -> None:
        for sid in samples:
            self.owner.pop(sid, None)
            self.want_prompt_lps.discard(sid)

    def _sample_done(self, head: str, sid: str) -> None:
        samples = self.live.get(head)
        self.owner.pop(sid, None)
        self.want_prompt_lps.discard(sid)
        if samples is not None:
            samples.discard(sid)
            if not samples:
                del self.live[head]

    # ---------------------------------------------------------------- outputs
    def _entries(self, outputs) -> list:
        entries = []
        for out in outputs:
            sid = out.request_id
            head = self.owner.get(sid)
            if head is None:
                continue  # ended by the front end while this step ran
            lps = out.logprobs
            plp = None
            if sid in self.want_prompt_lps:
                self.want_prompt_lps.discard(sid)
                plp = [wire.logprobs_to_wire(e) for e in (out.prompt_logprobs or [])]
            entries.append([sid, out.index, out.token_ids[-1], out.finish_reason, out.num_cached_tokens,
                            wire.logprobs_to_wire(lps[-1]) if lps else None, plp])
            if out.finish_reason is not None:
                self._sample_done(head, sid)
        return entries

    def _fail_all(self, message: str) -> None:
        heads = list(self.live)
        for head in heads:
            self.engine.abort(head)
            self._forget(self.live.pop(head))
        self._send(["failed", heads, message])
