"""``qkv serve --api-server-count N``: N front-end processes in front of the one engine process.

    supervisor (the ``qkv serve`` process: binds the port, no HTTP)
      ├── engine process (engine_process.py, engine_core.py): one PULL + one PUSH socket per front end
      └── front end i = 0..N-1: uvicorn + the app + its own EngineClient, serving listening socket i

The supervisor binds N listening sockets on the port with SO_REUSEPORT, one per front end,
before the model loads, and each front end serves its inherited socket: the kernel hashes
each new connection to one of them, so connections spread evenly. One socket shared by all
(uvicorn's ``--workers``) does not: asyncio's and libuv's accept loops take every pending
connection on one wake-up, so a burst of keep-alive connections lands on one front end and
stays there (64 streams over one client pool: 43/21, then 64/0 on the next round). A probe
bind without SO_REUSEPORT first makes a port in use fail at once, even when the holder is
another SO_REUSEPORT server (Linux lets only sockets of the same user join a group). Without
SO_REUSEPORT (not Linux or BSD) the front ends share one socket.

Front end ``i`` binds the ZeroMQ sockets ``in_addrs[i]``/``out_addrs[i]``; the engine knows a
command's front end by the socket it came on and sends each front end only its requests'
outputs (engine_core.py). Each front end's /metrics sums every front end's histograms and
request counters (prometheus_client's multiprocess mode, in a directory this supervisor makes
and removes), and the engine's gauges and token counters from the stats every front end receives;
/health answers for the front end that accepted the connection; every response carries
``X-Qkv-Frontend: i``.

Failure is loud, as with one front end: the engine's death makes every front end answer 500
``engine_dead`` and exit 1, and the supervisor then exits 1; a front end that exits on its own
stops the server (the others drain) with status 1. SIGTERM or SIGINT to the supervisor reaches
each front end once as SIGTERM (they sit in a process group of their own, so a terminal's
Ctrl-C does not reach them twice); each drains as a lone server does (draining.py), says
``shutdown`` to the engine, and the engine leaves once all have. Front ends and engine die with
the supervisor, even by SIGKILL (``PR_SET_PDEATHSIG`` and a ``getppid`` check each second).
"""

from __future__ import annotations

import multiprocessing
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

FRONTEND_STOP_S = 15.0  # after the engine died: how long the front ends get to answer 500s and exit


def check_count(args) -> str | None:
    """Why ``--api-server-count`` cannot be honoured with these flags, or None."""
    n = getattr(args, "api_server_count", 1)
    if n < 1:
        return f"--api-server-count must be at least 1 (got {n})"
    if n > 1 and getattr(args, "engine_in_process", False):
        return "--api-server-count above 1 needs the engine in a process of its own: drop --engine-in-process"
    return None


class FrontendHeader:
    """Pure ASGI: adds ``X-Qkv-Frontend: <index>`` to every response (which process served it)."""

    def __init__(self, app, index: int):
        self.app, self.value = app, str(index).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_index(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-qkv-frontend", self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_index)


class EngineHandle:
    """The engine process as a front end sees it: its sockets and whether it still runs. It is
    the supervisor's child, not ours, so liveness comes from a pidfd (Linux >= 5.3: readable
    once the process has exited, zombie or reaped), else from /proc. ``stop`` is the
    supervisor's business: here it does nothing."""

    exitcode = "unknown"  # not our child: the supervisor reaps it and reports the status

    def __init__(self, pid: int, in_addr: str, out_addr: str):
        self.pid, self.in_addr, self.out_addr = pid, in_addr, out_addr
        self._fd: int | None = None
        self._dead = False
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._dead = True
        except (AttributeError, OSError):  # no pidfd: /proc or kill(0) below
            pass

    def alive(self) -> bool:
        if self._dead:
            return False
        if self._fd is not None:
            self._dead = bool(select.select([self._fd], [], [], 0)[0])
        else:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    self._dead = f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
            except FileNotFoundError:
                self._dead = True
            except OSError:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    self._dead = True
        return not self._dead

    def stop(self, timeout: float = 10.0) -> None:
        pass


# ---------------------------------------------------------------- the supervisor
def serve_frontends(args, keys: list[str], extra: dict) -> int:
    """Bind the port, start the engine, then ``args.api_server_count`` front ends; supervise
    them until a signal or a death. The exit status (0 after a signal's clean drain)."""
    import functools

    from qkv.server.cli import _leave_a_core, engine_llm
    from qkv.server.engine_process import EngineProcess

    n = args.api_server_count
    try:
        socks = _bind(args.host, args.port, n)
    except OSError as e:
        print(f"qkv serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    port = socks[0].getsockname()[1]  # --port 0: the one the probe found
    _leave_a_core(args)
    engine = EngineProcess(functools.partial(engine_llm, args, extra), frontends=n)
    # The front ends start first and import what they need while the engine loads the model;
    # they get the model's description (and the engine's pid and sockets) once it has.
    ctx = multiprocessing.get_context("spawn")  # never fork: the children start clean
    # Each front end's metrics go to files here and a scrape sums them (metrics.py); set before
    # the children start, which import prometheus_client with it.
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir = tempfile.mkdtemp(prefix="qkv-metrics-")
    try:
        return _serve(args, keys, engine, socks, port, ctx, n)
    finally:
        shutil.rmtree(prom_dir, ignore_errors=True)
        if before is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = before


def _serve(args, keys: list[str], engine, socks: list, port: int, ctx, n: int) -> int:
    from qkv.server.cli import served_name

    fronts, pipes = [], []
    for i in range(n):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_frontend_main, name=f"qkv-frontend-{i}", daemon=False,
                        args=(i, args, keys, recv, socks[i % len(socks)], os.getpid()))
        p.start()
        recv.close()
        fronts.append(p)
        pipes.append(send)
    for sock in socks:
        sock.close()  # the front ends hold them now
    try:
        info = engine.start()
    except (ValueError, RuntimeError) as e:
        print(f"qkv serve: {e}", file=sys.stderr)
        for p in fronts:  # nothing served yet: nothing to drain
            p.kill()
            p.join()
        return 2 if isinstance(e, ValueError) else 1
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: signals.append(s))
    for i, send in enumerate(pipes):
        send.send((info, engine.pid, engine.in_addrs[i], engine.out_addrs[i]))
        send.close()
    name = args.served_model_name or served_name(args.model)
    print(f"qkv serve: {name} ({info['source']}) on http://{args.host}:{port}/v1 "
          f"({n} front-end processes{f', {len(keys)} API keys' if keys else ''})", file=sys.stderr, flush=True)
    return _supervise(engine, fronts, signals)


def _supervise(engine, fronts: list, signals: list[int]) -> int:
    from multiprocessing.connection import wait

    status, forwarded, stopping = 0, 0, False
    engine_gone_at = None
    live = list(fronts)
    while live:
        if len(signals) > forwarded:  # one SIGTERM per signal received: a second one stops them at once
            forwarded += 1
            stopping = True
            _signal_all(live, signal.SIGTERM)
        wait([p.sentinel for p in live] + ([engine.proc.sentinel] if engine_gone_at is None else []), 0.2)
        if engine_gone_at is None and not engine.alive():
            engine_gone_at = time.monotonic()
            if not stopping:
                print(f"qkv serve: the engine process died (status {engine.exitcode}); the front ends answer "
                      "500 and exit", file=sys.stderr, flush=True)
                status = 1
        for p in [p for p in live if not p.is_alive()]:
            live.remove(p)
            code = p.exitcode
            clean = stopping and code in (0, -signal.SIGTERM, -signal.SIGINT)
            if not clean and engine_gone_at is None:
                print(f"qkv serve: front end {p.name} exited (status {code}); stopping the server",
                      file=sys.stderr, flush=True)
                if not stopping:
                    stopping = True
                    _signal_all(live, signal.SIGTERM)
            if not clean:
                status = 1
        if engine_gone_at is not None and time.monotonic() - engine_gone_at > FRONTEND_STOP_S:
            _signal_all(live, signal.SIGKILL)
    engine.stop(10.0 if status == 0 else 1.0)  # it leaves by itself once every front end said shutdown
    return status


def _signal_all(procs: list, sig: int) -> None:
    for p in procs:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass


def _bind(host: str, port: int, n: int) -> list[socket.socket]:
    """N listening sockets on ``host:port`` with SO_REUSEPORT, or one when the OS lacks it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # SO_REUSEADDR on POSIX (create_server's default): a restart does not wait out TIME_WAIT.
    probe = socket.create_server((host, port), family=family)  # EADDRINUSE whoever holds the port
    if not hasattr(socket, "SO_REUSEPORT"):
        probe.listen(2048)
        return [probe]
    port = probe.getsockname()[1]
    probe.close()
    return [socket.create_server((host, port), family=family, backlog=2048, reuse_port=True) for _ in range(n)]


# ---------------------------------------------------------------- one front end
def _frontend_main(index: int, args, keys: list[str], conn, sock: socket.socket, parent_pid: int) -> None:
    from qkv.server.engine_process import _die_with_parent

    _die_with_parent(parent_pid)
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which forwards it once
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="qkv-parent-watch").start()
    import itertools

    import qkv.server.app  # the slow imports, while the engine loads the model

    # app.py suffixes each engine request id with a per-process counter, so that clients may
    # reuse an X-Request-Id; counting i, i + N, i + 2N, ... here keeps the ids unique across
    # front ends too (the engine refuses a live id twice).
    qkv.server.app._submissions = itertools.count(index, args.api_server_count)
    from qkv.server.cli import serve_app
    from qkv.server.remote_model import RemoteModel

    try:
        info, engine_pid, in_addr, out_addr = conn.recv()
    except EOFError:  # the engine did not start: the supervisor says why
        sys.exit(0)
    conn.close()
    llm = RemoteModel(info, EngineHandle(engine_pid, in_addr, out_addr))
    sys.exit(serve_app(args, llm, keys, sockets=[sock], frontend=index))


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)
