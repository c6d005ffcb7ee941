"""The API's one error shape, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.

Why OpenAI's: the official client raises these as its own exceptions, with their message, so a
caller using it sees what was wrong. `param` names the request field at fault, `code` is for
programs. `install_error_handlers` gives every failure this shape: a bad request body (400 naming
the field), an `APIError`, the store's `UserError`s (`NotFound` 404, `Conflict` 409, the rest 400)
and anything unexpected (500, logged on the server, never a traceback to the caller:
`fspo.serve.middleware.CrashGuard`). A generation's
failure is mapped here too: a remote model server's is a 502 naming the system (`remote_failure`),
raised as the response's error or, once a stream has begun, sent as its last event (`stream_error`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from fspo.core.errors import UserError
from fspo.serve.protocol import ErrorInfo, ErrorResponse
from fspo.serve.store import Conflict, NotFound

logger = logging.getLogger("fspo.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


class APIError(HTTPException):
    """An HTTP error whose body names the offending request field (`param`) and a machine `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status, message, param, code).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def validate_body(model: type[BaseModel], data: Any) -> Any:
    """`model` from `data`, with errors reported as the request's (named fields, status 400); for a
    body whose model is only known once it is read."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False, include_context=False)]
        ) from None


# How pydantic names a union's member in an error's location (``("prompt", "str")``, ``("prompt",
# "list[str]")``, ``("content", "TextPart")``): a type, never a field (the API's fields are snake_case).
_UNION_MEMBER = re.compile(r"[a-z-]+\[.*\]|str|int|float|bool|none|[A-Z]\w*")


def _field_path(loc: Sequence[Any]) -> str | None:
    """A pydantic error location as the field's path in the request: ``messages[1].content``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, str) and _UNION_MEMBER.fullmatch(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) of a failed validation: unknown fields first, since they are the likely
    typo, then malformed JSON, else the first five problems, each with its field."""
    unknown = [_field_path(e["loc"]) or "?" for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}", unknown[0], "unknown_field"
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        position = first["loc"][1] if len(first["loc"]) > 1 else "?"
        return f"malformed JSON body: {detail} (at character {position})", None, "invalid_json"
    problems = []
    for err in errors[:5]:
        where = _field_path(err["loc"]) or "body"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing" and where == "body":
            msg = "a JSON body is required"
        problems.append(f"{where}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(problems) + more, _field_path(first["loc"]), "invalid_value"


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, *_validation_message(exc.errors()))


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    param, code = getattr(exc, "param", None), getattr(exc, "code", None)
    return error_response(exc.status_code, message, param, code, headers=exc.headers)


async def _on_user_error(request: Request, exc: UserError) -> JSONResponse:
    status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
    # The store's errors name the field at fault (`field`), which is the API's `param`.
    return error_response(status, str(exc), getattr(exc, "field", None), type(exc).__name__.lower())


def install_error_handlers(app: FastAPI) -> None:
    """Give every failure of `app`'s routes the API's error shape."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(UserError, _on_user_error)
    # Anything else is `fspo.serve.middleware.CrashGuard`'s: a handler for Exception here would run in
    # Starlette's outermost layer, outside the security headers, and the server would drop the connection.


# ------------------------------------------------------------------------- a generation's failure


def remote_failure(system: str, err: Exception) -> APIError | None:
    """A 502 naming `system` when `err` is its remote server's failure (unreachable, timed out, an error
    status, a stream cut off), so the caller learns it was the model server and not their request or
    this server; None for any other error.

    The details (the server's address, its status and body) go to the server's log only: they describe
    the deployment, which is none of the caller's business, and a server's error body may echo anything.
    """
    import httpx
    import openai

    # openai wraps the request's failures; a stream cut off while being read raises httpx's own.
    if not isinstance(err, openai.APIError | httpx.HTTPError):
        return None
    try:
        where = f" at {err.request.url}"
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for an error without a request
        where = ""
    logger.warning("backend %r%s failed: %s", system, where, str(err) or type(err).__name__)
    return APIError(502, f"backend {system!r} failed (see the server log)", code="backend_error")


def raise_generation_failure(system: str, err: Exception) -> NoReturn:
    """Raise `system`'s generation failure `err` as the response's error: the 502 of `remote_failure`,
    else `err` itself (a `UserError` becomes a 400 naming its field, anything else a logged 500, by the
    handlers above)."""
    failure = remote_failure(system, err)
    if failure is None:
        raise err
    raise failure from err


def stream_error(system: str, err: Exception) -> ErrorResponse:
    """A generation's failure as the last event of a stream, whose status line is long gone: the error
    the unstreamed request would have got."""
    if isinstance(err, UserError):
        return error_body(400, str(err), code=type(err).__name__.lower())
    failure = remote_failure(system, err)
    if failure is not None:
        return error_body(failure.status_code, failure.detail, code=failure.code)
    logger.error("generation failed while streaming", exc_info=err)
    return error_body(500, "internal server error (logged on the server)", code="internal_error")
