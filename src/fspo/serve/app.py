"""The serving API: OpenAI-compatible completions personalized by the caller's stored preferences.

`create_app` builds a FastAPI app over a `Store` (users, keys, preferences) and the served
`System`s. A request's user is the user of its API key (``Authorization: Bearer <key>``), never a
field of the body; that user's stored preferences become the shots of an FSPO episode, which the
system's backend renders with the one template and answers.

Routes (user-scope keys, except ``/v1/admin/*``, which only admin-scope keys reach):
  POST /v1/chat/completions, POST /v1/completions (``stream`` for server-sent events), GET /v1/models
  GET /v1/users/me; POST/GET/DELETE /v1/users/me/preferences; DELETE /v1/users/me/preferences/{id}
  GET /v1/users/me/description (RAT's description of the caller, inferred from their preferences)
  GET /v1/admin/users, GET/POST /v1/admin/keys, DELETE /v1/admin/keys/{key_id}, GET /v1/admin/events
  /v1/study/* (from `fspo.serve.study`), and without a key: GET / (the page), /static/*, GET /healthz.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``, `param` naming the
offending field) so the official client raises them with their message. Blocking work (the
database, generation) runs in threads: generation in a pool of its own, so that requests waiting
for the model never hold the threads that database-only requests need.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Body as BodyParam
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fspo.core.errors import UserError
from fspo.data.schema import Preference
from fspo.infer.generate import Mode
from fspo.serve.engine import Answer, AnswerRequest, Backend, System
from fspo.serve.schemas import (
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationBody,
    PreferenceBatch,
    PreferenceIn,
)
from fspo.serve.store import Conflict, NotFound, Principal, Store

if TYPE_CHECKING:
    from fspo.serve.study import StudyConfig

logger = logging.getLogger("fspo.serve")

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 128  # an answer's tokens when the request names no max_tokens
# The question RAT's description is generated under at GET /v1/users/me/description: the model
# writes the description before any answer, so the question only has to be a plausible one.
DESCRIPTION_QUESTION = "What kind of answers do I prefer?"


@dataclass(frozen=True)
class Limits:
    """Bounds on one request, each protecting the server's memory or time from a single caller."""

    max_body_bytes: int = 64 << 10  # larger request bodies get 413
    max_shots: int = 32  # shots in one episode (a prompt's length grows with them)
    max_messages: int = 64  # messages of one chat request (only the last is answered)
    max_batch: int = 100  # preferences added by one request
    max_page: int = 200  # preferences listed by one request
    generation_threads: int = 4  # requests generating (or waiting for their model) at once


# --- errors: one OpenAI-shaped body for every failure -------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "server_error",
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


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def field_path(loc: Sequence[Any]) -> str | None:
    """A pydantic error location as the field's path in the request: ``messages[1].content``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None, str]:
    unknown = [field_path(e["loc"]) or "?" for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}", unknown[0], "unknown_field"
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        position = first["loc"][1] if len(first["loc"]) > 1 else "?"
        return f"malformed JSON body: {detail} (at character {position})", None, "invalid_json"
    problems = []
    for err in errors[:5]:
        where = field_path(err["loc"]) or "body"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing" and where == "body":
            msg = "a JSON body is required"
        problems.append(f"{where}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(problems) + more, field_path(first["loc"]), "invalid_value"


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param, code = _validation_message(exc.errors())
    return error_response(400, message, param, code)


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return error_response(
        exc.status_code,
        message,
        getattr(exc, "param", None),
        getattr(exc, "code", None),
        headers=getattr(exc, "headers", None),
    )


async def _on_user_error(request: Request, exc: UserError) -> JSONResponse:
    status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
    # The store's errors name the field at fault (`field`), which is the API's `param`.
    return error_response(status, str(exc), getattr(exc, "field", None), type(exc).__name__.lower())


async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this response, so the server logs its traceback;
    # the caller only learns that it was the server's fault.
    return error_response(500, "internal server error (logged on the server)", code="internal_error")


class _TooLarge(HTTPException):
    # An HTTPException so that FastAPI, reading the body when this is raised, lets it through to the
    # handlers (it turns any other error of reading the body into a 400).
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
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status, message = (
                (400, "invalid Content-Length header")
                if not declared.isdigit()
                else (413, f"request body too large (limit {self.max_bytes} bytes)")
            )
            await error_response(status, message)(scope, receive, send)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge as err:  # read outside FastAPI's handlers (none today): answer here
            if started:
                raise
            await error_response(413, str(err.detail))(scope, receive, send)


def validate_body(model: type[BaseModel], data: Any) -> Any:
    """`model` from `data`, with errors reported as the request's (named fields, status 400)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False, include_context=False)]
        ) from None


# --- authentication: the key is the identity ----------------------------------------------------


def principal_of(request: Request) -> Principal:
    """The caller of `request`, from its bearer key; 401 when missing, malformed, unknown or revoked."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if not header:
        raise APIError(
            401,
            "missing API key (send 'Authorization: Bearer <key>')",
            code="missing_api_key",
            headers=challenge,
        )
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "malformed Authorization header (expected 'Bearer <key>')",
            code="invalid_api_key",
            headers=challenge,
        )
    principal = request.app.state.store.authenticate(key.strip())
    if principal is None:
        raise APIError(401, "invalid or revoked API key", code="invalid_api_key", headers=challenge)
    return principal


def user_principal(principal: Principal = Depends(principal_of)) -> Principal:
    """The caller, who must hold a user-scope key (an admin key cannot act as a user)."""
    if principal.scope != "user":
        raise APIError(403, "an admin key cannot use user routes; use a user key", code="wrong_scope")
    return principal


def admin_principal(principal: Principal = Depends(principal_of)) -> Principal:
    """The caller, who must hold an admin-scope key."""
    if principal.scope != "admin":
        raise APIError(403, "this route needs an admin key", code="wrong_scope")
    return principal


# --- completions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """What a completion request resolves to: the system, the generation request, the shots' ids."""

    system: System
    request: AnswerRequest
    preference_ids: list[int]

    def fspo(self, answer: Answer) -> dict[str, Any]:
        return {
            "description": answer.description,
            "shots_used": len(self.preference_ids),
            "preference_ids": self.preference_ids,
            "mode": str(self.request.mode),
        }


def _system(app: FastAPI, name: str | None) -> System:
    systems: dict[str, System] = app.state.systems
    chosen = name or app.state.default_system
    if chosen not in systems:
        raise APIError(
            404,
            f"model: {chosen!r} is not served here (served: {', '.join(systems)})",
            param="model",
            code="model_not_found",
        )
    return systems[chosen]


def _shots(
    app: FastAPI, user_id: str, system: System, body: GenerationBody
) -> tuple[list[Preference], list[int]]:
    """The caller's shots (oldest first, as episodes order them) and their store ids."""
    store: Store = app.state.store
    limits: Limits = app.state.limits
    cap = limits.max_shots if system.shots is None else min(system.shots, limits.max_shots)
    if body.preference_ids is not None:
        ids = body.preference_ids
        if len(ids) > cap:
            raise APIError(
                400, f"preference_ids: at most {cap} for model {system.name!r}", param="preference_ids"
            )
        try:
            shots = store.shots(user_id, ids=ids)
        except NotFound as err:
            raise APIError(404, str(err), param="preference_ids", code="preference_not_found") from None
        return list(shots), sorted(ids)  # the store gives them oldest (smallest id) first
    if body.shots is not None and body.shots > limits.max_shots:
        raise APIError(400, f"shots: at most {limits.max_shots}", param="shots")
    # A system's shot count is its maximum: a zero-shot baseline stays zero-shot whatever is asked.
    n = cap if body.shots is None else min(body.shots, cap)
    stored = store.preferences(user_id, limit=n) if n > 0 else []
    stored = list(reversed(stored))  # newest n, oldest first
    return [p.record() for p in stored], [p.id for p in stored]


def prepare(app: FastAPI, user_id: str, body: ChatCompletionRequest | CompletionRequest) -> Prepared:
    """Resolve a completion request for `user_id` (blocking: reads the store)."""
    limits: Limits = app.state.limits
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > limits.max_messages:
        raise APIError(400, f"messages: at most {limits.max_messages}", param="messages")
    system = _system(app, body.model)
    backend = system.backend
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > backend.max_new_tokens_limit:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise APIError(
            400,
            f"{field}: at most {backend.max_new_tokens_limit} for model {system.name!r}, got {asked}",
            param=field,
        )
    shots, ids = _shots(app, user_id, system, body)
    mode = Mode(body.mode) if body.mode else system.served_mode
    request = AnswerRequest(
        shots=shots,
        question=body.question,
        mode=mode,
        max_new_tokens=asked or min(DEFAULT_MAX_TOKENS, backend.max_new_tokens_limit),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed or 0,
        cache_owner=user_id,
    )
    return Prepared(system, request, ids)


class StopCut:
    """Cuts a text stream at the first of the request's stop sequences.

    A stop sequence may arrive split across deltas, so the last ``longest - 1`` characters are held
    back until the next delta (or the end) shows whether they begin one.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _usage(answer: Answer) -> dict[str, Any]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": answer.cached_tokens},
    }


def _finish(answer: Answer, cut: StopCut) -> str:
    return "stop" if cut.stopped else answer.finish_reason


async def _generate(app: FastAPI, backend: Backend, request: AnswerRequest) -> Answer:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(app.state.generation_pool, backend.answer, request)


class _ClientGone(Exception):
    """Raised inside `on_text` once the client of a stream has left, to stop generating for nobody."""


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(
    app: FastAPI,
    prepared: Prepared,
    body: GenerationBody,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    first: dict[str, Any] | None,
) -> AsyncIterator[str]:
    """Server-sent events of one streamed completion: `chunk(delta, finish_reason)` shapes each event.

    The backend generates in the generation pool and hands each text delta to `on_text`, which
    posts it to this coroutine's queue through the event loop (the only thread-safe way into an
    asyncio queue). If the client disconnects, Starlette cancels this generator; `gone` then makes
    the next `on_text` raise, which ends the generation early.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    gone = threading.Event()

    def post(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server stopped while generating
            gone.set()

    def on_text(delta: str) -> None:
        if gone.is_set():
            raise _ClientGone
        post("text", delta)

    def work() -> None:
        try:
            post("done", prepared.system.backend.answer(prepared.request, on_text=on_text))
        except _ClientGone:
            pass
        except Exception as err:  # reported to the client as an error event, logged below
            post("error", err)

    cut = StopCut(body.stop_sequences)
    usage_field = {"usage": None} if body.include_usage else {}
    try:
        loop.run_in_executor(app.state.generation_pool, work)
        if first is not None:
            yield _sse({**first, **usage_field})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                text = cut.feed(value)
                if text:
                    yield _sse({**chunk(text, None), **usage_field})
            elif kind == "error":
                if isinstance(value, UserError):
                    yield _sse(error_body(400, str(value), code=type(value).__name__.lower()))
                else:
                    logger.error("generation failed while streaming", exc_info=value)
                    yield _sse(error_body(500, "internal server error (logged on the server)"))
                yield "data: [DONE]\n\n"
                return
            else:
                answer: Answer = value
                rest = cut.flush()
                if rest:
                    yield _sse({**chunk(rest, None), **usage_field})
                yield _sse(
                    {**chunk(None, _finish(answer, cut)), "fspo": prepared.fspo(answer), **usage_field}
                )
                if body.include_usage:
                    last = chunk(None, None)
                    yield _sse({**last, "choices": [], "usage": _usage(answer)})
                yield "data: [DONE]\n\n"
                return
    finally:
        gone.set()


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _chat_completions(request: Request, body: ChatCompletionRequest, principal: Principal) -> Any:
    app = request.app
    prepared = await run_in_threadpool(prepare, app, principal.user_id, body)
    head = {
        "id": _completion_id("chatcmpl"),
        "created": int(time.time()),
        "model": prepared.system.name,
        "system_fingerprint": None,
    }
    if body.stream:

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            return {
                **head,
                "object": "chat.completion.chunk",
                "choices": [
                    {
                        "index": 0,
                        "delta": {} if delta is None else {"content": delta},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
            }

        first = chunk("", None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return _event_stream(_stream(app, prepared, body, chunk, first))
    answer = await _generate(app, prepared.system.backend, prepared.request)
    cut = StopCut(body.stop_sequences)
    text = cut.feed(answer.text) + cut.flush()
    return {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": _finish(answer, cut),
                "logprobs": None,
            }
        ],
        "usage": _usage(answer),
        "fspo": prepared.fspo(answer),
    }


async def _completions(request: Request, body: CompletionRequest, principal: Principal) -> Any:
    app = request.app
    prepared = await run_in_threadpool(prepare, app, principal.user_id, body)
    head = {
        "id": _completion_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": prepared.system.name,
        "system_fingerprint": None,
    }
    if body.stream:

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {**head, "choices": [choice]}

        return _event_stream(_stream(app, prepared, body, chunk, None))
    answer = await _generate(app, prepared.system.backend, prepared.request)
    cut = StopCut(body.stop_sequences)
    text = cut.feed(answer.text) + cut.flush()
    return {
        **head,
        "choices": [{"index": 0, "text": text, "finish_reason": _finish(answer, cut), "logprobs": None}],
        "usage": _usage(answer),
        "fspo": prepared.fspo(answer),
    }


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each event must reach the client as it is generated.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


# --- preferences ------------------------------------------------------------------------------


def _forget(app: FastAPI, user_id: str) -> None:
    """Drop `user_id`'s cached shot prefixes on every backend: their preferences changed."""
    seen: set[int] = set()
    for system in app.state.systems.values():
        if id(system.backend) not in seen:
            seen.add(id(system.backend))
            system.backend.forget(user_id)


def _stored(pref: Any) -> dict[str, Any]:
    return {"object": "preference", **pref.model_dump(mode="json")}


class NewKey(Body):
    user_id: str = Field(min_length=1, max_length=200)
    scope: Literal["user", "admin"] = "user"
    name: str = Field("", max_length=200)


def _register_routes(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        index = STATIC / "index.html"
        if not index.is_file():
            raise APIError(404, "the page is not installed (no static/index.html)")
        return FileResponse(index)

    @app.get("/v1/models")
    def models(request: Request, principal: Principal = Depends(user_principal)) -> dict[str, Any]:
        systems: dict[str, System] = request.app.state.systems
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "fspo", "root": s.backend.model_id}
                for name, s in systems.items()
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(
        request: Request, body: ChatCompletionRequest, principal: Principal = Depends(user_principal)
    ) -> Any:
        return await _chat_completions(request, body, principal)

    @app.post("/v1/completions")
    async def completions(
        request: Request, body: CompletionRequest, principal: Principal = Depends(user_principal)
    ) -> Any:
        return await _completions(request, body, principal)

    @app.get("/v1/users/me")
    def me(request: Request, principal: Principal = Depends(user_principal)) -> dict[str, Any]:
        store: Store = request.app.state.store
        return {"user_id": principal.user_id, "preferences": store.count_preferences(principal.user_id)}

    @app.post("/v1/users/me/preferences", status_code=201)
    def add_preferences(
        request: Request,
        payload: Any = BodyParam(..., description="One preference, or {'preferences': [...]}"),
        principal: Principal = Depends(user_principal),
    ) -> dict[str, Any]:
        limits: Limits = request.app.state.limits
        many = isinstance(payload, dict) and "preferences" in payload
        items: list[PreferenceIn] = (
            validate_body(PreferenceBatch, payload).preferences
            if many
            else [validate_body(PreferenceIn, payload)]
        )
        if len(items) > limits.max_batch:
            raise APIError(400, f"preferences: at most {limits.max_batch} a request", param="preferences")
        records = [
            Preference(
                user_id=principal.user_id,
                question=p.question,
                chosen=p.chosen,
                rejected=p.rejected,
                metadata=p.metadata,
            )
            for p in items
        ]
        stored = request.app.state.store.add_preferences(principal.user_id, records, source="api")
        _forget(request.app, principal.user_id)
        return {"object": "list", "data": [_stored(p) for p in stored]}

    @app.get("/v1/users/me/preferences")
    def list_preferences(
        request: Request,
        limit: int = Query(50, ge=1),
        before: int | None = Query(None, description="Only preferences with a smaller id (the next page)"),
        principal: Principal = Depends(user_principal),
    ) -> dict[str, Any]:
        limits: Limits = request.app.state.limits
        if limit > limits.max_page:
            raise APIError(400, f"limit: at most {limits.max_page}", param="limit")
        page = request.app.state.store.preferences(principal.user_id, limit=limit + 1, before=before)
        more = len(page) > limit
        page = page[:limit]
        return {
            "object": "list",
            "data": [_stored(p) for p in page],
            "has_more": more,
            "next_before": page[-1].id if more else None,
        }

    @app.delete("/v1/users/me/preferences/{pref_id}")
    def delete_preference(
        request: Request, pref_id: int, principal: Principal = Depends(user_principal)
    ) -> dict[str, Any]:
        # Another user's id answers exactly like a missing one, so ids reveal nothing about others.
        if not request.app.state.store.delete_preference(principal.user_id, pref_id):
            raise APIError(
                404,
                f"pref_id: no preference {pref_id} of yours",
                param="pref_id",
                code="preference_not_found",
            )
        _forget(request.app, principal.user_id)
        return {"id": pref_id, "object": "preference", "deleted": True}

    @app.delete("/v1/users/me/preferences")
    def delete_preferences(
        request: Request, principal: Principal = Depends(user_principal)
    ) -> dict[str, Any]:
        count = request.app.state.store.delete_preferences(principal.user_id)
        _forget(request.app, principal.user_id)
        return {"object": "list", "deleted": count}

    @app.get("/v1/users/me/description")
    async def description(
        request: Request,
        model: str | None = Query(None, description="The served system to ask (default: the server's)"),
        shots: int | None = Query(None, ge=0),
        principal: Principal = Depends(user_principal),
    ) -> dict[str, Any]:
        app = request.app
        if not await run_in_threadpool(app.state.store.count_preferences, principal.user_id):
            raise APIError(409, "no preferences yet: add some first", code="no_preferences")
        body = CompletionRequest(prompt=DESCRIPTION_QUESTION, model=model, shots=shots, mode="rat")
        prepared = await run_in_threadpool(prepare, app, principal.user_id, body)
        budget = prepared.system.backend.max_new_tokens_limit  # room for the description and an answer
        req = dataclasses.replace(prepared.request, max_new_tokens=budget)
        answer = await _generate(app, prepared.system.backend, req)
        return {
            "object": "user.description",
            "description": answer.description,
            "model": prepared.system.name,
            "shots_used": len(prepared.preference_ids),
            "preference_ids": prepared.preference_ids,
        }

    # --- admin -----------------------------------------------------------------------------------

    @app.get("/v1/admin/users")
    def admin_users(request: Request, principal: Principal = Depends(admin_principal)) -> dict[str, Any]:
        store: Store = request.app.state.store
        return {
            "object": "list",
            "data": [
                {**u.model_dump(mode="json"), "preferences": store.count_preferences(u.user_id)}
                for u in store.users()
            ],
        }

    @app.get("/v1/admin/keys")
    def admin_keys(
        request: Request, user_id: str | None = None, principal: Principal = Depends(admin_principal)
    ) -> dict[str, Any]:
        keys = request.app.state.store.keys(user_id)
        return {"object": "list", "data": [k.model_dump(mode="json") for k in keys]}

    @app.post("/v1/admin/keys", status_code=201)
    def admin_create_key(
        request: Request, body: NewKey, principal: Principal = Depends(admin_principal)
    ) -> dict[str, Any]:
        store: Store = request.app.state.store
        info, key = store.create_key(body.user_id, scope=body.scope, name=body.name)
        return {**info.model_dump(mode="json"), "api_key": key}

    @app.delete("/v1/admin/keys/{key_id}")
    def admin_revoke_key(
        request: Request, key_id: str, principal: Principal = Depends(admin_principal)
    ) -> dict[str, Any]:
        if not request.app.state.store.revoke_key(key_id):
            raise APIError(404, f"key_id: no active key {key_id!r}", param="key_id", code="key_not_found")
        return {"id": key_id, "revoked": True}

    @app.get("/v1/admin/events")
    def admin_events(
        request: Request,
        user_id: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        principal: Principal = Depends(admin_principal),
    ) -> dict[str, Any]:
        events = request.app.state.store.events(user_id)[-limit:]
        return {"object": "list", "data": [e.model_dump(mode="json") for e in events]}


def create_app(
    store: Store,
    systems: Sequence[System],
    *,
    default_system: str | None = None,
    study: StudyConfig | None = None,
    limits: Limits = Limits(),
) -> FastAPI:
    """The serving app over `store` and the served `systems` (the first is the default unless named)."""
    if not systems:
        raise UserError("serve: no system to serve")
    by_name = {s.name: s for s in systems}
    if len(by_name) != len(systems):
        raise UserError(f"serve: system names must be distinct, got {[s.name for s in systems]}")
    default = default_system or systems[0].name
    if default not in by_name:
        raise UserError(f"serve: default system {default!r} is not one of {', '.join(by_name)}")
    if study is not None:
        study.check_systems(by_name)
    pool = ThreadPoolExecutor(limits.generation_threads, thread_name_prefix="fspo-generate")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="fspo serve",
        summary="Answers personalized by each user's own stored preferences (FSPO), OpenAI-compatible.",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.systems = by_name
    app.state.default_system = default
    app.state.study = study
    app.state.limits = limits
    app.state.generation_pool = pool

    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(UserError, _on_user_error)
    app.add_exception_handler(Exception, _on_crash)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)

    _register_routes(app)
    from fspo.serve.study import router as study_router

    app.include_router(study_router)
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app
