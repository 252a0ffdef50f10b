"""What ``medeyes serve`` puts in front of OpenEnv's app: request checks, and limits on the connections.

:class:`RequestGuard` (ASGI middleware) checks every HTTP request and WebSocket handshake, in order:

1. the route is one MedEyes serves (:data:`ROUTES`, :data:`TASK_ROUTES`; a WebSocket only on ``/ws``):
   OpenEnv's MCP sessions and web routes are not (404);
2. on a server without a token (which is bound to loopback), ``Host`` names loopback: a page on
   ``evil.example`` whose name now resolves to 127.0.0.1 (DNS rebinding) sends ``Host: evil.example`` (403);
3. no ``Origin`` header, or one allowed with ``--allow-origin``: browsers send one, programs do not, and
   browsers do not hold WebSockets to the same-origin policy (403);
4. the bearer token, on every route but :data:`OPEN_PATHS` (401; a WebSocket is refused with 403);
5. the body size (413); a WebSocket's first message within ``handshake_timeout_s`` and then one at least
   every ``idle_timeout_s``, or it is closed (1008); server paths in error frames become ``<server path>``.

:func:`limited_h11` is uvicorn's h11 protocol with a cap on open connections and a deadline for request
headers: a client that opens connections and never finishes its headers (slowloris) holds nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

TIMINGS_ROUTE = "/medeyes/timings"
"""Where a server started with ``--timings`` serves its time totals (404 on one without; it needs the token)."""

ROUTES = frozenset(
    {
        TIMINGS_ROUTE,
        "/ws",
        "/reset",
        "/step",
        "/state",
        "/schema",
        "/metadata",
        "/health",
        "/openapi.json",
        "/docs",
        "/redoc",
        "/mcp",
        "/list_environments",
    }
)
"""The fixed paths ``medeyes serve`` answers (``/mcp`` is its own stateless answer, not OpenEnv's)."""

TASK_ROUTES = frozenset({"/medeyes/splits", "/medeyes/num_tasks", "/medeyes/task", "/medeyes/task_range"})
"""OpenEnv's task API under the served env's name (matched in lower case, as OpenEnv matches the name)."""

APP_ROUTES = (ROUTES - {"/mcp"}) | {"/{env_name}/" + path.rpartition("/")[2] for path in TASK_ROUTES}
"""The route templates kept from OpenEnv's app; every other route it adds (its MCP, list_tasks, web) is removed."""

OPEN_PATHS = frozenset(
    {"/health", "/openapi.json", "/schema", "/metadata", "/mcp", "/list_environments"}
    | {"/medeyes/splits", "/medeyes/num_tasks"}
)
"""Routes a server with a token answers without it: discovery that carries no case data and no gold
(what the server is, its schemas, that it has no MCP tools, split names and sizes). Questions, images,
rewards and the task specs need the token."""

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

_PATH = re.compile(r"(?<![\w.:/~-])(?:/[^\s'\"<>:,;()\[\]{}/]+){2,}/?")
_log = logging.getLogger("medeyes.serve")


def redact_paths(text: str) -> str:
    """Replace absolute server paths (two parts or more) in a message with ``<server path>``.

    URLs and closing tags are left alone:

    >>> redact_paths("cannot read /data/vqa/img.png: see https://x.dev/a/b after </answer>")
    'cannot read <server path>: see https://x.dev/a/b after </answer>'
    """
    return _PATH.sub("<server path>", text)


class RequestGuard:
    """ASGI middleware: the checks in the module docstring, before OpenEnv's app sees a request.

    Pure ASGI rather than Starlette's ``BaseHTTPMiddleware`` because that one never sees WebSockets.
    """

    def __init__(
        self,
        app: Any,
        *,
        token: str | None,
        max_request_bytes: int,
        allow_origins: list[str],
        handshake_timeout_s: float,
        idle_timeout_s: float | None,
    ) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_request_bytes = max_request_bytes
        self.allow_origins = frozenset(allow_origins)
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Refuse what fails the checks; pass everything else through, with the limits applied."""
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, message = refusal
            if kind == "websocket":  # closing before accept: uvicorn answers the handshake with HTTP 403
                await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            else:
                await _json_error(send, status, message)
            return
        if kind == "websocket":
            await self._websocket(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            await _json_error(send, 413, f"request body over {self.max_request_bytes} bytes")
            return
        await self.app(scope, _capped(receive, self.max_request_bytes), send)

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        path = scope.get("path", "")
        route = path.lower() if path.lower() in TASK_ROUTES else path
        if route not in ROUTES | TASK_ROUTES or (scope["type"] == "websocket" and route != "/ws"):
            return 404, f"no route {path}: medeyes serve answers {', '.join(sorted(ROUTES | TASK_ROUTES))}"
        if scope["type"] == "websocket" and scope.get("query_string"):
            return 400, "WS /ws takes no query (attaching to another session is an MCP feature MedEyes turns off)"
        if self.expected is None:
            host = _hostname(_header(scope, b"host") or "")
            if host not in LOOPBACK_NAMES:
                return 403, (
                    f"Host {host!r} is not a loopback name: a server without a token answers only "
                    "localhost, 127.0.0.1 and [::1] (set a token to serve other names)"
                )
        origin = _header(scope, b"origin")
        if origin is not None and origin not in self.allow_origins:
            return 403, (
                f"Origin {origin!r} is not allowed: browsers are not clients "
                f"(start the server with --allow-origin {origin} to allow this page)"
            )
        if self.expected is not None and route not in OPEN_PATHS:
            given = (_header(scope, b"authorization") or "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):  # constant time: the token is a secret
                return 401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'"
        return None

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the app with a deadline on each incoming message and paths redacted from error frames."""
        frames = 0
        closed = False

        async def timed_receive() -> dict[str, Any]:
            nonlocal frames, closed
            timeout = self.handshake_timeout_s if frames == 0 else self.idle_timeout_s
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                reason = (
                    f"no message within {self.handshake_timeout_s} s of connecting"
                    if frames == 0
                    else f"no message for {self.idle_timeout_s} s"
                )
                closed = True
                await send({"type": "websocket.close", "code": 1008, "reason": reason})
                return {"type": "websocket.disconnect", "code": 1008}
            if message["type"] == "websocket.receive":
                frames += 1
            return message

        async def redacting_send(message: dict[str, Any]) -> None:
            if closed:  # the guard closed the socket; the app's own close comes after it
                return
            text = message.get("text")
            if message["type"] == "websocket.send" and text and text.startswith('{"type":"error"'):
                message = {**message, "text": _redacted_frame(text)}
            await send(message)

        await self.app(scope, timed_receive, redacting_send)


def _redacted_frame(text: str) -> str:
    frame = json.loads(text)
    data = frame.get("data") or {}
    message = data.get("message")
    if not isinstance(message, str) or redact_paths(message) == message:
        return text
    _log.warning("error frame to a client, paths redacted: %s", message)  # the operator still sees them
    data["message"] = redact_paths(message)
    return json.dumps(frame, separators=(",", ":"))


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key == name:
            return value.decode("latin-1")
    return None


def _hostname(host: str) -> str:
    """The name in a ``Host`` header, lower case, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _capped(receive: Any, limit: int) -> Any:
    """Wrap ``receive`` so a chunked body that grows past ``limit`` is cut off (no Content-Length to trust)."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # Starlette turns a disconnect into ClientDisconnect: the request ends, the server stays up.
                return {"type": "http.disconnect"}
        return message

    return wrapped


async def _json_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def limited_h11(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """The uvicorn h11 protocol with a connection cap and a deadline for request headers.

    A connection over ``max_connections`` is closed at once; one that has not finished a request's headers
    ``header_timeout_s`` after it opened, or after its last request, is closed then. The count is
    uvicorn's own set of open connections (HTTP and WebSocket together). Pass the class as
    ``uvicorn.Config(http=...)``.
    """

    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._scope_seen = self.scope
            self._header_timer = self.loop.call_later(header_timeout_s, self._check_headers)

        def _check_headers(self) -> None:
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed or a WebSocket
                return
            if self.conn.their_state is h11.IDLE and self.scope is self._scope_seen:
                self.transport.close()  # no new request's headers within the deadline
                return
            self._scope_seen = self.scope
            self._header_timer = self.loop.call_later(header_timeout_s, self._check_headers)

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return LimitedH11Protocol
