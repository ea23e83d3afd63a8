"""EngineClient: the front end's side of the engine process, with EngineLoop's interface.

``submit`` / ``abort`` send one msgpack message each on a ZeroMQ PUSH socket and never wait
for the engine. One asyncio task reads the engine's messages: each holds every output of one
engine step, which it turns into RequestOutputs (detokenizing and matching stop strings here,
detokenizer.py) and fans out to the per-request queues in one pass. A stop string matched
here ends that sample in the engine with a ``finish`` command.

A second task watches the process: once it has died, every request in flight and every new
one fails with EngineDead (the app answers 500 ``engine_dead``), ``alive`` turns false
(/health answers 503) and ``on_death`` is called (``qkv serve`` then exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from qkv.engine.request import RequestOutput, SamplingParams
from qkv.engine.scheduler import PoolBusy, RequestTooLarge
from qkv.server import wire
from qkv.engine.detokenizer import SampleText
from qkv.server.engine_loop import QueueFull, ShuttingDown, Stream

log = logging.getLogger("qkv.server")


class EngineDead(RuntimeError):
    """The engine process has exited: nothing can be generated any more."""


@dataclass
class _Sample:
    tokens: list[int]  # prompt, then outputs
    text: SampleText
    logprobs: list | None
    cumulative: float | None
    prompt_logprobs: list | None = None
    last: float = 0.0  # time of its last token
    done: bool = False


@dataclass
class _Route:
    stream: Stream
    params: SamplingParams
    prompts: dict[str, list[int]]  # head id -> prompt ids
    submitted: float
    samples: dict[str, _Sample] = field(default_factory=dict)
    finished: int = 0  # samples that have ended


class EngineClient:
    def __init__(self, process, engine, metrics=None, max_waiting: int | None = None, on_death=None):
        """``process``: a started EngineProcess; ``engine``: its RemoteEngine (tokenizer, eos ids)."""
        self.process, self.engine, self.metrics = process, engine, metrics
        self.max_waiting = max_waiting
        self.on_death = on_death
        self.stats: dict = engine.stats()
        self.error: str | None = None
        self.dead: str | None = None
        self._stopping = False
        self._queued = 0  # sequences sent in add commands the engine has not acknowledged
        self._waiting = 0  # sequences in the engine's waiting queue, as last reported
        self._routes: dict[str, _Route] = {}  # head id -> route
        self._adding: dict[str, _Route] = {}  # first head id -> route waiting for "added"
        self._tasks: list[asyncio.Task] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Bind the sockets and start the reader and the watcher (on the running event loop)."""
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never drop a command: an abort lost would leak blocks
        self._push.bind(self.process.in_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(self.process.out_addr)
        self._pack = wire.packer()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]

    def request_stop(self) -> None:
        """Abort every request (consumers get ShuttingDown); the engine keeps running."""
        if self._stopping:
            return
        self._stopping = True
        self._fail_all(ShuttingDown("the server is shutting down"), tell_engine=True)

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything, end the engine process and wait for it (no child is left)."""
        self.request_stop()
        if self.dead is None:
            self._send(["shutdown"])
        for t in self._tasks:
            t.cancel()
        self.process.stop(timeout)
        self._push.close(linger=0)
        self._pull.close(linger=0)
        self._ctx.term()

    @property
    def alive(self) -> bool:
        return self.dead is None and not self._stopping and self.process.alive()

    @property
    def num_waiting(self) -> int:
        return self._queued + self._waiting

    # ---------------------------------------------------------------- requests
    def submit(self, prompts: list[list[int]], params: SamplingParams, request_id: str,
               cache_salt: str | None = None, encoder_features: list | None = None) -> Stream:
        """As EngineLoop.submit; raises EngineDead at once when the engine process has died."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        stream = Stream(ids, asyncio.Queue(), len(prompts) * params.n)
        if self._stopping:
            stream.added.set_exception(ShuttingDown("the server is shutting down"))
            return stream
        asked, waiting = stream.num_samples, self.num_waiting
        if self.max_waiting is not None and waiting and waiting + asked > self.max_waiting:
            raise QueueFull(waiting, asked, self.max_waiting)
        features = [wire.tensor_to_wire(f) for f in encoder_features] if encoder_features else None
        try:  # packed first: a request that cannot be sent must leave nothing counted or routed
            data = self._pack(["add", ids, prompts, wire.params_to_wire(params), cache_salt, features])
        except (OverflowError, ValueError, TypeError) as e:  # e.g. an int >= 2**64 in a JSON schema
            raise ValueError(f"the request cannot be sent to the engine process: {e}") from None
        route = _Route(stream, params, dict(zip(ids, prompts)), time.monotonic())
        self._adding[ids[0]] = route
        for rid in ids:
            self._routes[rid] = route
        self._queued += asked
        self._send(["add"], data)
        return stream

    def abort(self, stream: Stream) -> None:
        live = [rid for rid in stream.request_ids if self._routes.get(rid) is not None]
        if not live:
            return
        route = self._routes[live[0]]
        for rid in live:
            del self._routes[rid]
        self._count_aborted(route)
        if self.dead is None:
            self._send(["abort", live])

    def _send(self, msg: list, data: bytes | None = None) -> None:
        """Send ``msg`` (``data``: its packed bytes, when packed already)."""
        # A blocking-mode send on an asyncio socket never blocks the loop: pyzmq sends at once when
        # it can and otherwise queues the message, in order, until the engine's socket has
        # connected (it may connect a few ms after /health turns 200). NOBLOCK would instead drop
        # the message silently into a future nobody reads: the request would hang for ever.
        fut = self._push.send(self._pack(msg) if data is None else data, copy=False)
        fut.add_done_callback(lambda f, kind=msg[0]: f.cancelled() or f.exception() is None or
                              log.warning("could not send %s to the engine: %s", kind, f.exception()))

    # ---------------------------------------------------------------- engine messages
    async def _read(self) -> None:
        while True:
            msg = wire.unpack(await self._pull.recv(copy=False))
            try:
                kind = msg[0]
                if kind == "out":
                    self._outputs(msg[1])
                    self._waiting = msg[2]
                    if msg[3] is not None:
                        self.stats = msg[3]
                elif kind == "added":
                    self._added(msg[1], msg[2])
                elif kind == "failed":
                    self.error = msg[2]
                    err = RuntimeError(msg[2])
                    for rid in msg[1]:
                        route = self._routes.pop(rid, None)
                        if route is not None:
                            route.stream.queue.put_nowait(err)
            except Exception:  # one bad message must not stop every stream
                log.exception("engine message %r failed", msg[0] if msg else msg)

    def _added(self, first: str, error: list | None) -> None:
        route = self._adding.pop(first, None)
        if route is None:
            return
        self._queued -= route.stream.num_samples
        fut: Future = route.stream.added
        if error is None:
            if not fut.done():
                fut.set_result([len(p) for p in route.prompts.values()])
            return
        for rid in route.stream.request_ids:
            self._routes.pop(rid, None)
        kind, message = error
        if not fut.done():
            fut.set_exception(RequestTooLarge(message) if kind == "RequestTooLarge" else PoolBusy(message)
                              if kind == "PoolBusy" else
                              ValueError(message) if kind == "ValueError" else RuntimeError(message))

    def _outputs(self, entries: list) -> None:
        now = time.monotonic()
        routes, metrics, finish, kept = self._routes, self.metrics, [], []
        for sid, index, tok, reason, cached, lp, plp in entries:
            head = sid.split("/", 1)[0]
            route = routes.get(head)
            if route is None:
                continue  # aborted while the step ran
            s = route.samples.get(sid)
            if s is None:
                p = route.params
                s = route.samples[sid] = _Sample(
                    list(route.prompts[head]), SampleText(self.engine.tokenizer, p, self.engine.eos_ids),
                    [] if p.logprobs is not None else None, 0.0 if p.logprobs is not None else None)
                if metrics is not None:
                    metrics.ttft.observe(now - route.submitted)
            elif s.done:
                continue  # ran on in the engine past its stop string
            elif metrics is not None:
                metrics.itl.observe(now - s.last)
            s.last = now
            if plp is not None:
                s.prompt_logprobs = [wire.logprobs_from_wire(e) for e in plp]
            if tok is None:  # a grammar's dead end: the sample ends without a token
                delta, stopped = "", False
            else:
                s.tokens.append(tok)
                if lp is not None and s.logprobs is not None:
                    entry = wire.logprobs_from_wire(lp)
                    s.logprobs.append(entry)
                    s.cumulative += entry[tok].logprob
                delta, stopped = s.text.push(tok)
            if stopped:
                if reason is None:  # the engine runs on until told
                    finish.append(sid)
                    kept.append(len(s.tokens) - len(route.prompts[head]))
                # As the engine's _append: a stop string wins over the length limit its token reached.
                reason = "stop"
            elif reason is not None:
                delta += s.text.flush()
            num_prompt = len(route.prompts[head])
            out = RequestOutput(sid, s.tokens, num_prompt, len(s.tokens), s.text.text, reason, cached, index,
                                delta, _logprobs=s.logprobs, prompt_logprobs=s.prompt_logprobs,
                                cumulative_logprob=s.cumulative)
            route.stream.queue.put_nowait(out)
            if reason is not None:
                s.done = True
                route.finished += 1
                if metrics is not None:
                    metrics.finished(reason, now - route.submitted)
                if route.finished == route.stream.num_samples:
                    for rid in route.stream.request_ids:
                        routes.pop(rid, None)
        if finish and self.dead is None:
            self._send(["finish", finish, kept])

    # ---------------------------------------------------------------- failures
    async def _watch(self) -> None:
        while self.process.alive():
            await asyncio.sleep(0.2)
        code = self.process.exitcode
        self.dead = f"the engine process exited (status {code}); this server cannot generate any more"
        log.error("%s", self.dead)
        self.error = self.dead
        self._fail_all(EngineDead(self.dead), tell_engine=False)
        if self.on_death is not None:
            self.on_death()

    def _fail_all(self, exc: BaseException, tell_engine: bool) -> None:
        for route in self._adding.values():
            if not route.stream.added.done():
                route.stream.added.set_exception(exc)
        self._adding.clear()
        self._queued = 0
        heads, seen = list(self._routes), set()
        for rid in heads:
            route = self._routes[rid]
            if id(route) not in seen:
                seen.add(id(route))
                self._count_aborted(route)
                route.stream.queue.put_nowait(exc)
        self._routes.clear()
        if tell_engine and heads:
            self._send(["abort", heads])

    def _count_aborted(self, route: _Route) -> None:
        if self.metrics is not None and route.stream.num_samples > route.finished:
            self.metrics.requests.labels(finish_reason="abort").inc(route.stream.num_samples - route.finished)
