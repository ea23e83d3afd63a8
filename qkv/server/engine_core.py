"""EngineCore: the engine process's busy loop. It schedules and steps; it never waits on HTTP.

Each turn it takes every command the front end has sent (non-blocking while there is work),
applies them, runs one ``engine.step()`` and sends all of that step's outputs to the front end
in one message (wire.py). Idle, it blocks on the command socket, waking every second to check
that its parent is still alive. The engine runs with ``detokenize = False``: outputs are token
ids, and the front end turns them into text and matches stop strings (docs/architecture.md);
a matched stop string comes back as a ``finish`` command for that sample.

Bookkeeping: ``live`` maps each submission's head id to its samples still running in the
engine, so ``abort`` and ``finish`` touch only what is live and nothing outlives its request.

Several front ends (``--api-server-count N``, frontends.py): one PULL and one PUSH socket per
front end. A command's front end is the socket it came on; ``home`` remembers which front end
added each request, so a step's outputs go out as one message per front end that has any
(with N = 1 that is today's one message a step), ``added`` and ``failed`` go to the front end
concerned, and stats to every front end. A front end may only abort or finish its own requests.
The loop ends once every front end has sent ``shutdown``.
"""

from __future__ import annotations

import logging
import os
import time

from qkv.engine.scheduler import RequestTooLarge
from qkv.server import wire

log = logging.getLogger("qkv.engine_core")


class EngineCore:
    def __init__(self, engine, in_addrs: str | list[str], out_addrs: str | list[str], parent_pid: int | None = None):
        self.engine = engine
        engine.detokenize = False
        self.in_addrs = [in_addrs] if isinstance(in_addrs, str) else list(in_addrs)
        self.out_addrs = [out_addrs] if isinstance(out_addrs, str) else list(out_addrs)
        assert len(self.in_addrs) == len(self.out_addrs) >= 1
        self.parent_pid = parent_pid
        self.n = len(self.in_addrs)  # front ends
        self.gone: set[int] = set()  # front ends that have sent "shutdown"
        self.live: dict[str, set[str]] = {}  # head id -> sample ids still running in the engine
        self.home: dict[str, int] = {}  # head id -> the front end that added it
        self.owner: dict[str, str] = {}  # sample id -> head id
        self.want_prompt_lps: set[str] = set()  # samples whose first output carries prompt logprobs
        self.produced: dict[str, int] = {}  # sample id -> output tokens sent (each counted as generated)
        self.stopping = False

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        import zmq

        ctx = zmq.Context()
        pulls, pushes = [], []
        poller = zmq.Poller()
        for in_addr, out_addr in zip(self.in_addrs, self.out_addrs):
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.RCVHWM, 0)  # commands are never dropped (see EngineClient)
            pull.connect(in_addr)
            poller.register(pull, zmq.POLLIN)
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 2000)
            push.connect(out_addr)
            pulls.append(pull)
            pushes.append(push)
        pack = wire.packer()
        # Outputs block when a front end is 1,000 messages behind (as with one front end); a
        # stats-only message to one of several is dropped instead: a front end that has died
        # must not stall the others' engine (the server then stops anyway).
        flags = 0 if self.n == 1 else zmq.NOBLOCK

        def send_to(i: int, msg: list, must: bool = True) -> None:
            if i in self.gone:
                return
            try:
                pushes[i].send(pack(msg), 0 if must else flags, copy=False)
            except zmq.Again:
                pass

        self._send_to = send_to
        wait = pulls[0].poll if self.n == 1 else poller.poll
        engine = self.engine
        last_stats, last_parent_check, dirty = 0.0, time.monotonic(), True
        try:
            while not self.stopping:
                if not engine.has_unfinished():
                    if dirty:  # idle now: let /metrics see the final state (blocks freed, ...)
                        msg = ["out", [], self._waiting(), engine.stats()]
                        for i in range(self.n):
                            send_to(i, msg, must=False)
                        dirty = False
                    if not wait(1000):
                        self._check_parent()
                        continue
                for src, pull in enumerate(pulls):
                    while True:  # every command that has arrived, without waiting
                        try:
                            msg = pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._apply(wire.unpack(msg), src)
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
                    waiting = self._waiting()
                    for i, entries in enumerate(self._entries(outputs)):
                        if entries or stats is not None:
                            send_to(i, ["out", entries, waiting, stats], must=bool(entries))
                if now - last_parent_check >= 1.0:
                    last_parent_check = now
                    self._check_parent()
        finally:
            for head in list(self.live):
                engine.abort(head)
            for push in pushes:
                push.close()
            for pull in pulls:
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
    def _apply(self, msg: list, src: int = 0) -> None:
        kind = msg[0]
        if kind == "add":
            self._add(src, *msg[1:])
        elif kind == "abort":
            for head in msg[1]:
                if self.home.get(head) == src:
                    self.engine.abort(head)
                    self._forget(self.live.pop(head))
                    del self.home[head]
        elif kind == "finish":
            for sid, kept in zip(msg[1], msg[2]):
                head = self.owner.get(sid)
                samples = self.live.get(head) if head is not None else None
                if samples is not None and sid in samples and self.home.get(head) == src:
                    # Tokens made past the stop string before this command came were never served:
                    # /metrics counts the served ones, as the in-process engine (which stops at once) does.
                    self.engine.num_generated_tokens -= max(0, self.produced.get(sid, 0) - kept)
                    self.engine.finish(sid)
                    self._sample_done(head, sid)
        elif kind == "shutdown":
            self.gone.add(src)
            self.stopping = len(self.gone) == self.n
        else:
            log.error("unknown command %r", kind)

    def _add(self, src: int, heads: list[str], prompts: list[list[int]], params: dict, salt, features) -> None:
        added: list[str] = []
        try:
            p = wire.params_from_wire(params)
            for rid, ids, feats in zip(heads, prompts, features or [None] * len(prompts)):
                reqs = self.engine.add_request(ids, p, request_id=rid, cache_salt=salt,
                                               encoder_features=wire.tensor_from_wire(feats))
                added.append(rid)
                self.live[rid] = {r.request_id for r in reqs}
                self.home[rid] = src
                for r in reqs:
                    self.owner[r.request_id] = rid
                    if p.prompt_logprobs is not None:
                        self.want_prompt_lps.add(r.request_id)
        except Exception as e:  # ValueError for a request that can never run: nothing stays queued
            for rid in added:
                self.engine.abort(rid)
                self._forget(self.live.pop(rid))
                del self.home[rid]
            kind = "RequestTooLarge" if isinstance(e, RequestTooLarge) else \
                "ValueError" if isinstance(e, ValueError) else type(e).__name__
            self._send_to(src, ["added", heads[0], [kind, str(e)]])
            return
        self._send_to(src, ["added", heads[0], None])

    def _forget(self, samples: set[str]) -> None:
        for sid in samples:
            self.owner.pop(sid, None)
            self.want_prompt_lps.discard(sid)
            self.produced.pop(sid, None)

    def _sample_done(self, head: str, sid: str) -> None:
        samples = self.live.get(head)
        self.owner.pop(sid, None)
        self.want_prompt_lps.discard(sid)
        self.produced.pop(sid, None)
        if samples is not None:
            samples.discard(sid)
            if not samples:
                del self.live[head]
                del self.home[head]

    # ---------------------------------------------------------------- outputs
    def _entries(self, outputs) -> list[list]:
        """The step's output entries, one list per front end."""
        per = [[] for _ in range(self.n)]
        home = self.home
        for out in outputs:
            sid = out.request_id
            head = self.owner.get(sid)
            if head is None:
                continue  # ended by the front end while this step ran
            entries = per[home[head]]
            lps = out.logprobs
            plp = None
            if sid in self.want_prompt_lps:
                self.want_prompt_lps.discard(sid)
                plp = [wire.logprobs_to_wire(e) for e in (out.prompt_logprobs or [])]
            # A grammar's dead end can end the sample without a token (engine/structured.py): None.
            tok = out.token_ids[-1] if len(out.token_ids) > self.produced.get(sid, 0) else None
            if tok is not None:
                self.produced[sid] = self.produced.get(sid, 0) + 1
            entries.append([sid, out.index, tok, out.finish_reason, out.num_cached_tokens,
                            wire.logprobs_to_wire(lps[-1]) if lps and tok is not None else None, plp])
            if out.finish_reason is not None:
                self._sample_done(head, sid)
        return per

    def _fail_all(self, message: str) -> None:
        per: list[list[str]] = [[] for _ in range(self.n)]
        for head in list(self.live):
            self.engine.abort(head)
            self._forget(self.live.pop(head))
            per[self.home.pop(head)].append(head)
        for i, heads in enumerate(per):
            if heads or self.n == 1:
                self._send_to(i, ["failed", heads, message])
