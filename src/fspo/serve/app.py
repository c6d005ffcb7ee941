"""The serving API: OpenAI-compatible completions personalized by the caller's stored preferences.

`create_app` builds a FastAPI app over a `Store` (users, keys, preferences) and the served
`System`s. A request's user is the user of its API key (`fspo.serve.auth`); that user's stored
preferences become the shots of an FSPO episode (`fspo.serve.answers`), which the system's backend
renders with the one template and answers.

Routes (user-scope keys, except ``/v1/admin/*``, which only admin-scope keys reach):
  POST /v1/chat/completions, POST /v1/completions (``stream`` for server-sent events), GET /v1/models
  GET /v1/users/me; POST/GET/DELETE /v1/users/me/preferences; DELETE /v1/users/me/preferences/{id}
  GET /v1/users/me/description (RAT's description of the caller, inferred from their preferences)
  GET /v1/admin/users, GET/POST /v1/admin/keys, DELETE /v1/admin/keys/{key_id}, GET /v1/admin/events
  /v1/study/* (`fspo.serve.study`, participants only), and without a key: GET / (the page), /static/*,
  GET /healthz, GET /openapi.json (no /docs: Swagger's page loads its scripts from a CDN).

Every error is OpenAI-shaped (`fspo.serve.errors`); every response carries the browser protections
of `SecurityHeaders` (no framing, no sniffing, API answers never cached). Blocking work (the database,
generation) runs in threads: generation in a pool of its own, so that requests waiting for the model
never hold the threads that database-only requests need.
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
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Body as BodyParam
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fspo.core.errors import UserError
from fspo.infer.generate import Mode
from fspo.serve.answers import Limits, Prepared, backend_failure, generate, prepare, raise_failure
from fspo.serve.auth import admin_principal, user_principal
from fspo.serve.engine import Answer, System
from fspo.serve.errors import APIError, error_body, error_response, install_error_handlers, validate_body
from fspo.serve.schemas import (
    INT64_MAX,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationBody,
    NewKey,
    PreferenceBatch,
)
from fspo.serve.store import NewPreference, Principal, Store
from fspo.serve.study import StudyConfig
from fspo.serve.study import router as study_router

logger = logging.getLogger("fspo.serve")

STATIC = Path(__file__).parent / "static"
# The question RAT's description is generated under at GET /v1/users/me/description: the model
# writes the description before any answer, so the question only has to be a plausible one.
DESCRIPTION_QUESTION = "What kind of answers do I prefer?"


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


# --- completions ------------------------------------------------------------------------------


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

    def finish_reason(self, answer: Answer) -> str:
        return "stop" if self.stopped else answer.finish_reason


def _usage(answer: Answer) -> dict[str, Any]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": answer.cached_tokens},
    }


class _ClientGone(Exception):
    """Raised inside `on_text` once the client of a stream has left, to stop generating for nobody."""


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_event(system: System, err: Exception) -> dict[str, Any]:
    """A generation's failure as the error event of a stream (its status line is long gone)."""
    if isinstance(err, UserError):
        return error_body(400, str(err), code=type(err).__name__.lower())
    failure = backend_failure(system, err)
    if failure is not None:
        return error_body(failure.status_code, failure.detail, code=failure.code)
    logger.error("generation failed while streaming", exc_info=err)
    return error_body(500, "internal server error (logged on the server)", code="internal_error")


async def _start_stream(
    app: FastAPI,
    prepared: Prepared,
    body: GenerationBody,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    first: dict[str, Any] | None,
) -> StreamingResponse:
    """The server-sent events of one streamed completion: `chunk(delta, finish_reason)` shapes each.

    The generation starts here, and its first event (a text delta, the end, or a failure) is awaited
    before the response begins: a request that fails before any text (a prompt longer than the
    model's context, the backend down, a crash) gets the status and JSON error it would get unstreamed
    (400, 502, 500). Only a failure after text was sent, when the status line is long gone, becomes an
    error event in the stream.

    The backend generates in the generation pool and hands each text delta to `on_text`, which posts
    it to this request's queue through the event loop (the only thread-safe way into an asyncio
    queue). If the client disconnects, Starlette cancels the events' generator; `gone` then makes the
    next `on_text` raise, which ends the generation early.
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
        except Exception as err:  # raised as the response's error, or sent as an error event
            post("error", err)

    loop.run_in_executor(app.state.generation_pool, work)
    try:
        head = await queue.get()
    except BaseException:  # cancelled while waiting: nobody will read what is generated
        gone.set()
        raise
    if head[0] == "error":
        raise_failure(prepared.system, head[1])
    return _event_stream(_events(queue, head, gone, prepared, body, chunk, first))


async def _events(
    queue: asyncio.Queue[tuple[str, Any]],
    head: tuple[str, Any],
    gone: threading.Event,
    prepared: Prepared,
    body: GenerationBody,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    first: dict[str, Any] | None,
) -> AsyncIterator[str]:
    """The events of `_start_stream`, from its generation's first event `head` on."""
    cut = StopCut(body.stop_sequences)
    usage_field = {"usage": None} if body.include_usage else {}
    event = head
    try:
        if first is not None:
            yield _sse({**first, **usage_field})
        while True:
            kind, value = event
            if kind == "text":
                text = cut.feed(value)
                if text:
                    yield _sse({**chunk(text, None), **usage_field})
                event = await queue.get()
                continue
            if kind == "error":
                yield _sse(_error_event(prepared.system, value))
            else:
                answer: Answer = value
                rest = cut.flush()
                if rest:
                    yield _sse({**chunk(rest, None), **usage_field})
                final = chunk(None, cut.finish_reason(answer))
                yield _sse({**final, "fspo": prepared.fspo(answer), **usage_field})
                if body.include_usage:
                    yield _sse({**chunk(None, None), "choices": [], "usage": _usage(answer)})
            yield "data: [DONE]\n\n"
            return
    finally:
        gone.set()


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each event must reach the client as it is generated.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


router = APIRouter()


@router.get("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    index = STATIC / "index.html"
    if not index.is_file():
        raise APIError(404, "the page is not installed (no static/index.html)")
    return FileResponse(index)


@router.get("/v1/models")
def models(request: Request, principal: Principal = Depends(user_principal)) -> dict[str, Any]:
    systems: dict[str, System] = request.app.state.systems
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "fspo", "root": s.backend.model_id}
            for name, s in systems.items()
        ],
    }


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request, body: ChatCompletionRequest, principal: Principal = Depends(user_principal)
) -> Any:
    app = request.app
    prepared = await run_in_threadpool(prepare, app, principal.user_id, body)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": prepared.system.name,
        "system_fingerprint": None,
    }
    if body.stream:

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            choice = {
                "index": 0,
                "delta": {} if delta is None else {"content": delta},
                "finish_reason": finish,
                "logprobs": None,
            }
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        first = chunk("", None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return await _start_stream(app, prepared, body, chunk, first)
    answer = await generate(app, prepared.system, prepared.request)
    cut = StopCut(body.stop_sequences)
    text = cut.feed(answer.text) + cut.flush()
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "finish_reason": cut.finish_reason(answer),
        "logprobs": None,
    }
    return {
        **head,
        "object": "chat.completion",
        "choices": [choice],
        "usage": _usage(answer),
        "fspo": prepared.fspo(answer),
    }


@router.post("/v1/completions")
async def completions(
    request: Request, body: CompletionRequest, principal: Principal = Depends(user_principal)
) -> Any:
    app = request.app
    prepared = await run_in_threadpool(prepare, app, principal.user_id, body)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": prepared.system.name,
        "system_fingerprint": None,
    }
    if body.stream:

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {**head, "choices": [choice]}

        return await _start_stream(app, prepared, body, chunk, None)
    answer = await generate(app, prepared.system, prepared.request)
    cut = StopCut(body.stop_sequences)
    text = cut.feed(answer.text) + cut.flush()
    choice = {"index": 0, "text": text, "finish_reason": cut.finish_reason(answer), "logprobs": None}
    return {**head, "choices": [choice], "usage": _usage(answer), "fspo": prepared.fspo(answer)}


# --- the caller's preferences -----------------------------------------------------------------


def _forget(app: FastAPI, user_id: str) -> None:
    """Drop `user_id`'s cached shot prefixes on every backend: their preferences changed."""
    for backend in {id(s.backend): s.backend for s in app.state.systems.values()}.values():
        backend.forget(user_id)


def _stored(pref: Any) -> dict[str, Any]:
    return {"object": "preference", **pref.model_dump(mode="json")}


@router.get("/v1/users/me")
def me(request: Request, principal: Principal = Depends(user_principal)) -> dict[str, Any]:
    store: Store = request.app.state.store
    return {"user_id": principal.user_id, "preferences": store.count_preferences(principal.user_id)}


@router.post("/v1/users/me/preferences", status_code=201)
def add_preferences(
    request: Request,
    payload: Any = BodyParam(..., description="One preference, or {'preferences': [...]}"),
    principal: Principal = Depends(user_principal),
) -> dict[str, Any]:
    limits: Limits = request.app.state.limits
    if isinstance(payload, dict) and "preferences" in payload:
        items = validate_body(PreferenceBatch, payload).preferences
    else:
        items = [validate_body(NewPreference, payload)]
    if len(items) > limits.max_batch:
        raise APIError(400, f"preferences: at most {limits.max_batch} a request", param="preferences")
    stored = request.app.state.store.add_preferences(principal.user_id, items, source="api")
    _forget(request.app, principal.user_id)
    return {"object": "list", "data": [_stored(p) for p in stored]}


@router.get("/v1/users/me/preferences")
def list_preferences(
    request: Request,
    limit: int = Query(50, ge=1),
    before: int | None = Query(
        None, ge=1, le=INT64_MAX, description="Only preferences with a smaller id (the next page)"
    ),
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


@router.delete("/v1/users/me/preferences/{pref_id}")
def delete_preference(
    request: Request,
    pref_id: int = PathParam(ge=1, le=INT64_MAX),
    principal: Principal = Depends(user_principal),
) -> dict[str, Any]:
    # Another user's id answers exactly like a missing one, so ids reveal nothing about others.
    if not request.app.state.store.delete_preference(principal.user_id, pref_id):
        raise APIError(
            404, f"pref_id: no preference {pref_id} of yours", param="pref_id", code="preference_not_found"
        )
    _forget(request.app, principal.user_id)
    return {"id": pref_id, "object": "preference", "deleted": True}


@router.delete("/v1/users/me/preferences")
def delete_preferences(request: Request, principal: Principal = Depends(user_principal)) -> dict[str, Any]:
    count = request.app.state.store.delete_preferences(principal.user_id)
    _forget(request.app, principal.user_id)
    return {"object": "list", "deleted": count}


@router.get("/v1/users/me/description")
async def description(
    request: Request,
    model: str | None = Query(None, description="The served system to ask (default: the server's)"),
    shots: int | None = Query(None, ge=0, le=INT64_MAX),
    principal: Principal = Depends(user_principal),
) -> dict[str, Any]:
    """RAT's description of the caller: what a RAT-served system writes, from the caller's preferences
    as shots, before its answer. Refused (400, naming why) where there would be nothing to report: a
    system that is not served in RAT mode writes no description, and one without shots (``shots=0``
    or a zero-shot system) has nothing of the caller's to describe. ``description`` is null only when
    the model wrote an empty one."""
    app = request.app
    if not await run_in_threadpool(app.state.store.count_preferences, principal.user_id):
        raise APIError(409, "no preferences yet: add some first", code="no_preferences")
    name = model or app.state.default_system
    system = app.state.systems.get(name)
    if system is not None and system.served_mode is not Mode.RAT:
        raise APIError(
            400,
            f"model: {name!r} is served in {system.served_mode} mode and writes no description; "
            f"ask a system served in rat mode",
            param="model",
            code="not_rat",
        )
    body = CompletionRequest(prompt=DESCRIPTION_QUESTION, model=model, shots=shots, mode="rat")
    prepared = await run_in_threadpool(prepare, app, principal.user_id, body)
    system = prepared.system
    if not prepared.preference_ids:
        why = "shots=0" if shots == 0 else f"model {system.name!r} takes no shots"
        raise APIError(
            400, f"shots: a description needs at least one of your preferences ({why})", param="shots"
        )
    # The whole budget: the description comes first, and the answer after it must not cut it short.
    req = dataclasses.replace(prepared.request, max_new_tokens=system.backend.max_new_tokens_limit)
    answer = await generate(app, system, req)
    return {
        "object": "user.description",
        "description": answer.description,
        "model": system.name,
        "shots_used": len(prepared.preference_ids),
        "preference_ids": prepared.preference_ids,
    }


# --- admin ------------------------------------------------------------------------------------


@router.get("/v1/admin/users")
def admin_users(request: Request, principal: Principal = Depends(admin_principal)) -> dict[str, Any]:
    store: Store = request.app.state.store
    counts = store.preference_counts()
    return {
        "object": "list",
        "data": [
            {**u.model_dump(mode="json"), "preferences": counts.get(u.user_id, 0)} for u in store.users()
        ],
    }


@router.get("/v1/admin/keys")
def admin_keys(
    request: Request, user_id: str | None = None, principal: Principal = Depends(admin_principal)
) -> dict[str, Any]:
    keys = request.app.state.store.keys(user_id)
    return {"object": "list", "data": [k.model_dump(mode="json") for k in keys]}


@router.post("/v1/admin/keys", status_code=201)
def admin_create_key(
    request: Request, body: NewKey, principal: Principal = Depends(admin_principal)
) -> dict[str, Any]:
    info, key = request.app.state.store.create_key(body.user_id, scope=body.scope, name=body.name)
    return {**info.model_dump(mode="json"), "api_key": key}


@router.delete("/v1/admin/keys/{key_id}")
def admin_revoke_key(
    request: Request, key_id: str, principal: Principal = Depends(admin_principal)
) -> dict[str, Any]:
    if not request.app.state.store.revoke_key(key_id):
        raise APIError(404, f"key_id: no active key {key_id!r}", param="key_id", code="key_not_found")
    return {"id": key_id, "revoked": True}


@router.get("/v1/admin/events")
def admin_events(
    request: Request,
    user_id: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    principal: Principal = Depends(admin_principal),
) -> dict[str, Any]:
    events = request.app.state.store.events(user_id, limit=limit)
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
        # No /docs or /redoc: they load their scripts from a CDN, which the page's policy (and a server
        # that may run without internet) rules out. /openapi.json stays: it lists routes, no data.
        docs_url=None,
        redoc_url=None,
    )
    app.state.store = store
    app.state.systems = by_name
    app.state.default_system = default
    app.state.study = study
    app.state.limits = limits
    app.state.generation_pool = pool
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(SecurityHeaders)  # added last: outermost, so the 413s above get the headers too
    app.include_router(router)
    app.include_router(study_router)
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app
