"""EngineLoop: one background thread that owns the LLMEngine; everyone else sends it commands.

The engine is not thread-safe, so only the loop thread ever touches it. HTTP handlers (on
the asyncio event loop) call ``submit`` and ``abort``, which only append a command to a
list under a lock and wake the thread. The thread applies pending commands, runs one
``engine.step()``, and hands each RequestOutput to the asyncio queue of the request it
belongs to with ``loop.call_soon_threadsafe``. With nothing to do it sleeps on the condition.

Contract: a submitted stream receives every output of each of its samples, the last one
with ``finish_reason`` set, or one exception (add rejected, engine failure, shutdown) after
which nothing more arrives. A consumer that stops listening must call ``abort``: that is
what returns the blocks of a request whose client hung up.

Admission: ``submit`` refuses (QueueFull) a submission that would take the sequences waiting
for a seat (queued commands plus the scheduler's waiting queue) beyond ``max_waiting``; an
empty queue always takes one submission, however large, so nothing is refused forever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from qkv.engine.request import RequestOutput, SamplingParams

log = logging.getLogger("qkv.server")


class ShuttingDown(RuntimeError):
    """The server is stopping: the request was aborted."""


class QueueFull(RuntimeError):
    """Too many sequences wait already: try again later."""

    def __init__(self, waiting: int, asked: int, limit: int):
        super().__init__(f"the server is busy: {waiting} sequences wait for a seat and this request adds "
                         f"{asked}, beyond the limit of {limit}; retry later")


@dataclass
class Stream:
    """The consumer's end of one submission (one or more prompts, each with n samples)."""

    request_ids: list[str]  # one engine request per prompt; samples are "<id>/<i>"
    queue: asyncio.Queue  # RequestOutput | BaseException, in engine order
    num_samples: int  # outputs with finish_reason set that end the stream
    added: Future = field(default_factory=Future)  # result: prompt token counts; or the add error


@dataclass
class _Route:
    loop: asyncio.AbstractEventLoop
    stream: Stream
    samples_per_prompt: int
    submitted: float  # for time to first token
    last: dict[str, float] = field(default_factory=dict)  # sample id -> time of its last token
    done: set = field(default_factory=set)  # finished sample ids


class EngineLoop:
    def __init__(self, engine, metrics=None, max_waiting: int | None = None):
        """``metrics``: a ServerMetrics (or None) that the thread reports latencies to.
        ``max_waiting``: sequences allowed to wait for a seat (None: unbounded)."""
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._queued = 0  # sequences in add commands not applied yet; under _cond
        self._waiting = 0  # sequences in the scheduler's waiting queue; written under _cond
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._routes: dict[str, _Route] = {}  # engine request id (head) -> route; loop thread only
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats: dict = engine.stats()  # a snapshot, replaced (never mutated) by the thread
        self.error: str | None = None  # the last engine failure (also logged)

    # ---------------------------------------------------------------- any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qkv-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort every request (consumers get ShuttingDown) and join the thread."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def request_stop(self) -> None:
        """``stop`` without the join: safe to call from the event loop, which must not block."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a seat: queued commands plus the scheduler's waiting queue."""
        with self._cond:
            return self._queued + self._waiting

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, prompts: list[list[int]], params: SamplingParams, request_id: str,
               cache_salt: str | None = None, encoder_features: list | None = None) -> Stream:
        """Queue prompts on the calling asyncio loop's behalf. Await ``stream.added`` (wrapped)
        to learn whether the engine took them: it raises the engine's ValueError if not.
        Raises QueueFull at once (nothing queued) when the waiting queue is full.
        ``encoder_features``: one encoder input per prompt (Whisper's log-mel), or None."""
        loop = asyncio.get_running_loop()
        ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        stream = Stream(ids, asyncio.Queue(), len(prompts) * params.n)
        self._send(("add", prompts, params, _Route(loop, stream, params.n, time.monotonic()), cache_salt,
                    encoder_features or [None] * len(prompts)))
        return stream

    def abort(self, stream: Stream) -> None:
        self._send(("abort", stream.request_ids))

    def _send(self, cmd: tuple) -> None:
        with self._cond:
            if self._stopping:
                if cmd[0] == "add":
                    cmd[3].stream.added.set_exception(ShuttingDown("the server is shutting down"))
                return
            if cmd[0] == "add":
                asked = cmd[3].stream.num_samples
                waiting = self._queued + self._waiting
                if self.max_waiting is not None and waiting and waiting + asked > self.max_waiting:
                    raise QueueFull(waiting, asked, self.max_waiting)
                self._queued += asked
            self._commands.append(cmd)
            self._cond.notify()

    # ---------------------------------------------------------------- loop thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not self.engine.has_unfinished():
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for cmd in commands:
                try:
                    self._apply(cmd)
                except Exception:  # never let one command kill the only thread that serves
                    log.exception("engine command %s failed", cmd[0])
            applied = sum(c[3].stream.num_samples for c in commands if c[0] == "add")
            self._count_waiting(applied)
            if stopping:
                self._fail_all(ShuttingDown("the server is shutting down"))
                self.stats = self.engine.stats()
                return
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a bug or a pool too small: fail what is running, keep serving
                    log.exception("engine step failed")
                    self.error = f"{type(e).__name__}: {e}"
                    self._fail_all(e)
                    outputs = []
                self._dispatch(outputs)
                self._count_waiting(0)
            self.stats = self.engine.stats()

    def _count_waiting(self, applied: int) -> None:
        # Unforked siblings wait with their head: n=4 waits as 4 sequences.
        waiting = sum(1 + len(r.forks) for r in self.engine.scheduler.waiting)
        with self._cond:
            self._queued -= applied
            self._waiting = waiting

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "abort":
            for rid in cmd[1]:
                route = self._routes.pop(rid, None)
                if route is not None:
                    self.engine.abort(rid)
                    self._count_aborted(rid, route)
            return
        _, prompts, params, route, salt, features = cmd
        added: list[str] = []
        try:
            for rid, ids, feats in zip(route.stream.request_ids, prompts, features):
                self.engine.add_request(ids, params, request_id=rid, cache_salt=salt, encoder_features=feats)
                added.append(rid)
        except Exception as e:  # ValueError for a request that can never run: nothing stays queued
            for rid in added:
                self.engine.abort(rid)
            route.stream.added.set_exception(e)
            return
        for rid in added:
            self._routes[rid] = route
        route.stream.added.set_result([len(p) for p in prompts])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            head = out.request_id.split("/", 1)[0]
            route = self._routes.get(head)
            if route is None:
                continue  # aborted while this step ran
            if self.metrics is not None:
                last = route.last.get(out.request_id)
                if last is None:
                    self.metrics.ttft.observe(now - route.submitted)
                else:
                    self.metrics.itl.observe(now - last)
                if out.finished:
                    self.metrics.finished(out.finish_reason, now - route.submitted)
            route.last[out.request_id] = now
            _deliver(route, out)
            if out.finished:
                route.done.add(out.request_id)
                if sum(k.split("/", 1)[0] == head for k in route.done) == route.samples_per_prompt:
                    self._routes.pop(head, None)  # the engine has forgotten all its samples

    def _fail_all(self, exc: BaseException) -> None:
        for rid, route in list(self._routes.items()):
            self.engine.abort(rid)
            self._count_aborted(rid, route)
            _deliver(route, exc)
        self._routes.clear()

    def _count_aborted(self, head: str, route: _Route) -> None:
        """The finished-sequences counter counts sequences: an aborted n=4 prompt whose
        samples all ran adds 4, less those that had finished on their own."""
        if self.metrics is None:
            return
        done = sum(k.split("/", 1)[0] == head for k in route.done)
        if route.samples_per_prompt > done:
            self.metrics.requests.labels(finish_reason="abort").inc(route.samples_per_prompt - done)


def _deliver(route: _Route, item) -> None:
    try:
        route.loop.call_soon_threadsafe(route.stream.queue.put_nowait, item)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
