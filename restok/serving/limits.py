"""Bounds on what a client can hold: the request body's size (413) and the time to send it (408), and the
time a connection may stay open without sending a whole request's headers (closed). Without them a
client that never finishes its request keeps a file descriptor forever: 260 such connections exhausted a
256-file limit and every real request failed."""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from restok.serving.errors import error_body


class BodyLimits:
    """ASGI middleware: reads the request body before the app sees it, so that its bounds hold whatever the
    route does with it (FastAPI turns any error while it reads a body into a 400): a body over ``max_bytes``
    gets 413 (declared too large: before any of it is read), a body not received within ``timeout`` seconds
    gets 408; the app then gets the body whole, and after it the connection's own messages (disconnect)."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send, 413, f"the request body is over {self.max_bytes} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await self._refuse(send, 408, f"the request body did not arrive within {self.timeout:g}s")
            if message["type"] != "http.request":  # the client left before its body was whole
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, 413, f"the request body is over {self.max_bytes} bytes")
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, status: int, message: str) -> None:
        body = json.dumps(error_body(status, message, None, "request_too_large" if status == 413 else "timeout")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request's headers within
    ``seconds`` of opening or of its previous response (idle keep-alive connections close sooner, after
    uvicorn's keep-alive timeout)."""

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            armed = self.cycle
            self.loop.call_later(seconds, self._close_if_no_request, armed)

        def _close_if_no_request(self, armed) -> None:
            if self.transport.is_closing():
                return
            waiting = self.cycle is armed and (self.cycle is None or self.cycle.response_complete)
            if waiting:
                self.transport.close()

    return HeaderTimeoutH11
