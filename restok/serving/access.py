"""One place that sees every request's answer: the request id (the client's ``X-Request-ID`` or a new one,
echoed in the response), one JSON access-log line per request, and the request metrics (every status
counted, latency by status) — whether the answer came from a route, an error handler, the body limits or
the framework's own 404/405."""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from typing import Callable

REQUEST_ID_HEADER = b"x-request-id"
_GOOD_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
OPS_PATHS = ("/health/", "/metrics")  # probes and scrapes: logged only when they fail, never counted


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a short plain token, else a new random one (never echo arbitrary bytes)."""
    for k, v in headers:
        if k.lower() == REQUEST_ID_HEADER:
            text = v.decode("latin-1")
            if _GOOD_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class AccessLog:
    """ASGI middleware, outermost: sets ``scope["state"]["request_id"]``, adds X-Request-ID to the response,
    and when the answer is complete calls ``record(status, seconds)`` (API routes) and writes one JSON line
    with what the route put in ``scope["state"]["access"]`` (images, queue and run times)."""

    def __init__(self, app, record: Callable[[int, float], None], log: bool = True):
        self.app, self.record, self.log = app, record, log  # sys.stderr is looked up per line: the app pickles (Ray)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        rid = request_id_of(scope.get("headers") or [])
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = None  # no answer at all: the client left first (499, as nginx logs it)

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500 if status is None else status  # Starlette's error middleware, outside, answers 500
            raise
        finally:
            seconds = time.monotonic() - t0
            status = 499 if status is None else status
            path = scope.get("path", "")
            ops = path.startswith(OPS_PATHS)
            if not ops:
                self.record(status, seconds)
            if self.log and (not ops or status >= 400):
                line = {"time": round(time.time(), 3), "request_id": rid, "method": scope.get("method"), "path": path,
                        "status": status, "ms": round(seconds * 1000, 3),
                        "client": (scope.get("client") or [None])[0], **state.get("access", {})}
                try:
                    sys.stderr.write(json.dumps(line) + "\n")
                    sys.stderr.flush()
                except (OSError, ValueError):  # a closed or full log stream never fails a request
                    pass
