"""HTTP plumbing around the app: CORS and ``X-Request-Id``.

``install(app, cors)`` adds both as middleware. The request id is the client's
``X-Request-Id`` when it sent a usable one (1-128 visible ASCII characters, no ``/``,
which the engine uses to name samples), else a fresh one; it is echoed on every response
(errors, 404s, streams, CORS preflights) and names the response (``chatcmpl-<id>``) and
begins the engine's request id (``chatcmpl-<id>#<n>``: unique, since clients may reuse an
id), so log lines about a request name it. A client that sends an unusable
id gets it refused (400) rather than silently replaced.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

HEADER = "x-request-id"
_USABLE = re.compile(r"[\x21-\x2e\x30-\x7e]{1,128}")  # visible ASCII without "/"


@dataclass
class CORS:
    """What browsers may do cross-origin; no origins (the default) adds no CORS headers at all."""

    allowed_origins: list[str] = field(default_factory=list)
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False


def request_id(request) -> str:
    """The id the middleware chose for this request (``request.state.request_id``)."""
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (no buffering, so streams stay streams): puts the id in
    ``scope["state"]["request_id"]`` and the header on the response start."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.decode("latin-1").lower() == HEADER),
                    None)
        if sent is not None and not _USABLE.fullmatch(sent):
            return await _refuse(send, sent)
        rid = sent or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


async def _refuse(send, sent: str) -> None:
    import json

    body = json.dumps({"error": {"message": "X-Request-Id: must be 1 to 128 visible ASCII characters without '/'",
                                 "type": "invalid_request_error", "code": "invalid_value",
                                 "param": "X-Request-Id"}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install(app, cors: CORS | None) -> None:
    """CORS inside, the request id outside it: a preflight answered by CORS carries the id too."""
    if cors is not None and cors.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins, allow_methods=cors.allowed_methods,
                           allow_headers=cors.allowed_headers, allow_credentials=cors.allow_credentials,
                           expose_headers=["X-Request-Id"])
    app.add_middleware(RequestIdMiddleware)  # added last: the outermost of the two
