"""The ASGI layers around every route: the browser protections, the Host check, a bound on request
bodies, and the last resort that turns a crash into the API's 500.

Each is a small ASGI class of its own rather than Starlette's equivalent because every answer they
give must be the API's JSON error (`fspo.serve.errors`) with the same headers as any other response:
Starlette's TrustedHostMiddleware answers in plain text, and its ServerErrorMiddleware sits outside
every middleware added to the app, so its 500 would carry none of `SECURITY_HEADERS` and the server
would drop the keep-alive connection after it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fspo.serve.errors import error_response

logger = logging.getLogger("fspo.serve")


class HTTPLayer:
    """An ASGI layer that acts on HTTP requests (`http`) and passes anything else (lifespan) through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class _TooLarge(HTTPException):
    # An HTTPException so that FastAPI, reading the body when this is raised, lets it through to the
    # error handlers (it turns any other error of reading the body into a 400).
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class BodySizeLimit(HTTPLayer):
    """413 for a request body over `max_bytes`, declared (Content-Length) or streamed (chunked).

    A declared length over the limit is refused before a byte is read; a body without one is
    counted as it arrives and refused once past the limit, so no request makes the server buffer
    more than `max_bytes`. (FastAPI's own `max_body_size` answers in plain text, not in the API's
    JSON error shape, and is missing from older FastAPI versions.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        super().__init__(app)
        self.max_bytes = max_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and not declared.isdigit():
            await error_response(400, "invalid Content-Length header")(scope, receive, send)
            return
        if declared is not None and int(declared) > self.max_bytes:
            await error_response(413, _TooLarge(self.max_bytes).detail)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


# The page's policy (the same as its <meta> tag, which cannot say frame-ancestors): everything from this
# server, no inline script, and no framing by any site, so no other page can overlay and click it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",  # a JSON answer holding user text is never run as a script
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders(HTTPLayer):
    """The browser protections of `SECURITY_HEADERS` on every response, and ``Cache-Control: no-store``
    on the API's (``/v1/*``): they hold a user's preferences and answers, which no shared cache or
    browser history should keep."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = scope["path"].startswith("/v1/")

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if api:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_secured)


class CrashGuard(HTTPLayer):
    """A logged 500 in the API's error shape for anything a route raised that no handler took.

    It sits inside `SecurityHeaders`, so the 500 carries every header an answer does, and it does not
    re-raise, so the server keeps the connection. Once a response has begun (a stream), its status line
    is gone: the exception is logged and the response ends there (streams send their own error event
    first, `fspo.serve.completions`)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(
                    500, "internal server error (logged on the server)", code="internal_error"
                )
                await response(scope, receive, send)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class HostCheck(HTTPLayer):
    """400 for a request whose Host header names none of `allowed` (``*``: any): a page served to a
    name the operator did not choose is how DNS rebinding lets another site's script call a server on
    this machine with the browser's own access to it. A name matches exactly, without its port;
    ``*.example.org`` matches its subdomains."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]):
        super().__init__(app)
        self.allowed = [a.lower() for a in allowed]
        self.any = "*" in self.allowed

    def allows(self, host: str) -> bool:
        host = host.lower()
        name = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in self.allowed)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = Headers(scope=scope).get("host", "")
        if not self.any and not self.allows(host):
            message = f"Host {host!r} is not served here (fspo serve --allowed-host names the hosts)"
            await error_response(400, message, code="invalid_host")(scope, receive, send)
            return
        await self.app(scope, receive, send)
