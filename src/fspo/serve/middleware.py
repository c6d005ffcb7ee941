"""The ASGI layers around every route: a bound on request bodies and the browser protections."""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fspo.serve.errors import error_response


class _TooLarge(HTTPException):
    # An HTTPException so that FastAPI, reading the body when this is raised, lets it through to the
    # error handlers (it turns any other error of reading the body into a 400).
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class BodySizeLimit:
    """413 for a request body over `max_bytes`, declared (Content-Length) or streamed (chunked).

    A declared length over the limit is refused before a byte is read; a body without one is
    counted as it arrives and refused once past the limit, so no request makes the server buffer
    more than `max_bytes`. (FastAPI's own `max_body_size` answers in plain text, not in the API's
    JSON error shape, and is missing from older FastAPI versions.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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


class SecurityHeaders:
    """The browser protections of `SECURITY_HEADERS` on every response, and ``Cache-Control: no-store``
    on the API's (``/v1/*``): they hold a user's preferences and answers, which no shared cache or
    browser history should keep."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
