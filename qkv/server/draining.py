"""A uvicorn server that drains the app before it stops accepting connections.

Plain uvicorn closes its listening socket on the first SIGTERM, so during its grace period a
new request meets a refused connection, and when the period ends open streams are cut
without their last event. Here the first SIGTERM/SIGINT runs the app's ``drain(timeout)``
(app.py) while the socket stays open: new requests get 503 ``shutting_down``, open
responses finish or are aborted with an error event and ``data: [DONE]``. Only then does
uvicorn's own shutdown start. A second signal is uvicorn's as usual: stop now.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[float], Awaitable[None]], timeout: float):
        super().__init__(config)
        self._drain, self._timeout = drain, timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs in the signal handler (the main thread, between two bytecodes of the event loop).
        if self._draining or self._loop is None or not self.started:
            return super().handle_exit(sig, frame)
        self._draining = True
        self._captured_signals.append(sig)  # uvicorn re-raises it once stopped, as it always does
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._task = self._loop.create_task(self._drain_then_exit())  # held: a bare task may be collected

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain(self._timeout)
        finally:
            self.should_exit = True
