"""EngineProcess: start the engine in a process of its own and watch it.

    proc = EngineProcess(factory)   # factory(): an LLM, called in the child (picklable)
    info = proc.start()             # blocks until the model is loaded; RuntimeError if it failed
    ... EngineClient(proc, ...) talks to it over proc.in_addr / proc.out_addr (ZeroMQ ipc) ...
    proc.stop()                     # shutdown command, then SIGTERM, then SIGKILL

``EngineProcess(factory, frontends=N)`` serves N front-end processes (``--api-server-count``,
frontends.py): front end ``i`` binds ``in_addrs[i]`` and ``out_addrs[i]`` (``in_addr`` and
``out_addr`` are front end 0's, the only pair when N is 1).

The child is spawned (never forked: CUDA and threads do not survive a fork), loads the model,
sends ``describe(llm)`` back over a pipe, then runs EngineCore's busy loop. It dies with its
parent: ``PR_SET_PDEATHSIG`` (Linux) kills it when the parent dies, even by SIGKILL, and the
loop also polls ``getppid`` (elsewhere). It ignores SIGINT, so Ctrl-C in a terminal (sent to
the whole process group) reaches only the server, which drains and then stops the engine.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time


class EngineProcess:
    def __init__(self, factory, startup_timeout: float | None = None, frontends: int = 1):
        self.factory = factory
        self.startup_timeout = startup_timeout
        self.dir = tempfile.mkdtemp(prefix="qkv-engine-")  # 0700: only this user reaches the sockets
        suffix = [""] + [str(i) for i in range(1, frontends)]
        self.in_addrs = [f"ipc://{self.dir}/in{s}" for s in suffix]
        self.out_addrs = [f"ipc://{self.dir}/out{s}" for s in suffix]
        self.in_addr, self.out_addr = self.in_addrs[0], self.out_addrs[0]
        self.proc: multiprocessing.Process | None = None

    def start(self) -> dict:
        """Spawn the child; return its ``describe`` dict once the model is loaded."""
        ctx = multiprocessing.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_main, name="qkv-engine", daemon=False,
                                args=(self.factory, self.in_addrs, self.out_addrs, send, os.getpid()))
        self.proc.start()
        send.close()
        atexit.register(self.stop)  # runs before multiprocessing's own exit hook joins children
        deadline = None if self.startup_timeout is None else time.monotonic() + self.startup_timeout
        while True:
            if recv.poll(0.2):
                try:
                    kind, payload = recv.recv()
                except EOFError:
                    kind, payload = "error", None
                if kind == "ready":
                    return payload
                self.stop()
                if kind == "usage":  # the model or a flag was refused: the caller's input, not a crash
                    raise ValueError(payload)
                raise RuntimeError(payload or f"the engine process exited with status {self.proc.exitcode} "
                                   "while loading the model")
            if not self.proc.is_alive():
                self.stop()
                raise RuntimeError(f"the engine process exited with status {self.proc.exitcode} while loading "
                                   "the model")
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the engine process did not load the model within {self.startup_timeout:.0f} s")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode if self.proc is not None else None

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the child to leave (the client sends it ``shutdown`` first), then make it."""
        if self.proc is not None and self.proc.pid is not None:
            self.proc.join(timeout if self.proc.is_alive() else 0)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _main(factory, in_addrs: list[str], out_addrs: list[str], conn, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from qkv.server.remote_model import describe

    try:
        llm = factory()
        info = describe(llm)
    except BaseException as e:  # the parent prints it and exits non-zero (2 for bad input, as in-process)
        from qkv.loading.errors import LoadError

        bad_input = isinstance(e, (ValueError, LoadError, FileNotFoundError))
        conn.send(("usage" if bad_input else "error", str(e) if bad_input else f"{type(e).__name__}: {e}"))
        conn.close()
        sys.exit(1)
    conn.send(("ready", info))
    conn.close()
    from qkv.server.engine_core import EngineCore

    EngineCore(llm.engine, in_addrs, out_addrs, parent_pid).run()
