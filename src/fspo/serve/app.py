"""The serving API: OpenAI-compatible completions personalized by the caller's stored preferences.

`create_app` builds a FastAPI app over a `Store` (users, keys, preferences) and the served
`System`s. A request's user is the user of its API key (`fspo.serve.auth`); that user's stored
preferences become the shots of an FSPO episode (`fspo.serve.serving`), which the system renders
with the one template and answers.

Three layers, as vLLM's OpenAI server has them: these routes only read the request and call a
handler (`fspo.serve.completions`, `fspo.serve.serving`, the store); every request and response body
is a typed model of `fspo.serve.protocol`.

Routes (user-scope keys, except ``/v1/admin/*``, which only admin-scope keys reach):
  POST /v1/chat/completions, POST /v1/completions (``stream`` for server-sent events), GET /v1/models,
  GET /v1/models/{model}
  GET /v1/users/me; POST/GET/DELETE /v1/users/me/preferences; DELETE /v1/users/me/preferences/{id}
  GET /v1/users/me/description (RAT's description of the caller, inferred from their preferences)
  GET /v1/admin/users, GET/POST /v1/admin/keys, DELETE /v1/admin/keys/{key_id}, GET /v1/admin/events
  /v1/study/* (`fspo.serve.study`, participants only), and without a key: GET / (the page), /static/*,
  GET /healthz, GET /openapi.json (no /docs: Swagger's page loads its scripts from a CDN).

Every error is OpenAI-shaped (`fspo.serve.errors`); every response carries the browser protections
of `fspo.serve.middleware.SecurityHeaders` (no framing, no sniffing, API answers never cached).
Blocking work (the database, generation) runs in threads: generation in a pool of its own, so that
requests waiting for the model never hold the threads that database-only requests need.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Body as BodyParam
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from fspo.core.errors import UserError
from fspo.infer.generate import Decoding
from fspo.serve.answerers import System
from fspo.serve.auth import admin_principal, user_principal
from fspo.serve.completions import CHAT, TEXT, complete
from fspo.serve.errors import APIError, install_error_handlers, validate_body
from fspo.serve.middleware import LOOPBACK_HOSTS, BodySizeLimit, CrashGuard, HostCheck, SecurityHeaders
from fspo.serve.protocol import (
    INT64_MAX,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    CompletionResponse,
    CreatedKey,
    DeletedPreference,
    DeletedPreferences,
    EventList,
    Health,
    KeyList,
    Me,
    ModelCard,
    ModelList,
    NewKey,
    PreferenceBatch,
    PreferenceList,
    PreferenceObject,
    PreferencePage,
    RevokedKey,
    UserDescription,
    UserList,
    UserSummary,
)
from fspo.serve.serving import Limits, check_preference_limits, describe, forget_shots
from fspo.serve.store import NewPreference, Principal, Store
from fspo.serve.study import StudyConfig
from fspo.serve.study import router as study_router
from fspo.serve.throttle import Throttle

STATIC = Path(__file__).parent / "static"

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
def healthz() -> Health:
    return Health()


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    index = STATIC / "index.html"
    if not index.is_file():
        raise APIError(404, "the page is not installed (no static/index.html)")
    return FileResponse(index)


@router.get("/v1/models")
def models(request: Request, principal: Principal = Depends(user_principal)) -> ModelList:
    systems: dict[str, System] = request.app.state.systems
    return ModelList(data=[ModelCard(id=name, root=s.answerer.model_id) for name, s in systems.items()])


@router.get("/v1/models/{model}")
def model_card(request: Request, model: str, principal: Principal = Depends(user_principal)) -> ModelCard:
    system: System | None = request.app.state.systems.get(model)
    if system is None:
        raise APIError(404, f"model: {model!r} is not served here", param="model", code="model_not_found")
    return ModelCard(id=model, root=system.answerer.model_id)


# ``response_model``: the whole answer's type; a streamed answer is a `StreamingResponse` of chunks.
@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, principal: Principal = Depends(user_principal)
) -> CompletionResponse | StreamingResponse:
    return await complete(request.app, principal.user_id, body, CHAT)


@router.post("/v1/completions", response_model=Completion)
async def completions(
    request: Request, body: CompletionRequest, principal: Principal = Depends(user_principal)
) -> CompletionResponse | StreamingResponse:
    return await complete(request.app, principal.user_id, body, TEXT)


# --- the caller's preferences -----------------------------------------------------------------


@router.get("/v1/users/me")
def me(request: Request, principal: Principal = Depends(user_principal)) -> Me:
    store: Store = request.app.state.store
    return Me(user_id=principal.user_id, preferences=store.count_preferences(principal.user_id))


@router.post("/v1/users/me/preferences", status_code=201)
def add_preferences(
    request: Request,
    payload: Any = BodyParam(..., description="One preference, or {'preferences': [...]}"),
    principal: Principal = Depends(user_principal),
) -> PreferenceList:
    limits: Limits = request.app.state.limits
    if isinstance(payload, dict) and "preferences" in payload:
        items = validate_body(PreferenceBatch, payload).preferences
    else:
        items = [validate_body(NewPreference, payload)]
    if len(items) > limits.max_batch:
        raise APIError(400, f"preferences: at most {limits.max_batch} a request", param="preferences")
    store: Store = request.app.state.store
    check_preference_limits(limits, items, store.count_preferences(principal.user_id))
    stored = store.add_preferences(principal.user_id, items, source="api")
    forget_shots(request.app, principal.user_id)
    return PreferenceList.of(stored)


@router.get("/v1/users/me/preferences")
def list_preferences(
    request: Request,
    limit: int = Query(50, ge=1),
    before: int | None = Query(
        None, ge=1, le=INT64_MAX, description="Only preferences with a smaller id (the next page)"
    ),
    principal: Principal = Depends(user_principal),
) -> PreferencePage:
    limits: Limits = request.app.state.limits
    if limit > limits.max_page:
        raise APIError(400, f"limit: at most {limits.max_page}", param="limit")
    page = request.app.state.store.preferences(principal.user_id, limit=limit + 1, before=before)
    more = len(page) > limit
    page = page[:limit]
    return PreferencePage(
        data=[PreferenceObject.of(p) for p in page],
        has_more=more,
        next_before=page[-1].id if more else None,
    )


@router.delete("/v1/users/me/preferences/{pref_id}")
def delete_preference(
    request: Request,
    pref_id: int = PathParam(ge=1, le=INT64_MAX),
    principal: Principal = Depends(user_principal),
) -> DeletedPreference:
    # Another user's id answers exactly like a missing one, so ids reveal nothing about others.
    if not request.app.state.store.delete_preference(principal.user_id, pref_id):
        raise APIError(
            404, f"pref_id: no preference {pref_id} of yours", param="pref_id", code="preference_not_found"
        )
    forget_shots(request.app, principal.user_id)
    return DeletedPreference(id=pref_id)


@router.delete("/v1/users/me/preferences")
def delete_preferences(
    request: Request, principal: Principal = Depends(user_principal)
) -> DeletedPreferences:
    count = request.app.state.store.delete_preferences(principal.user_id)
    forget_shots(request.app, principal.user_id)
    return DeletedPreferences(deleted=count)


@router.get("/v1/users/me/description")
async def description(
    request: Request,
    model: str | None = Query(None, description="The served system to ask (default: the server's)"),
    shots: int | None = Query(None, ge=0, le=INT64_MAX),
    principal: Principal = Depends(user_principal),
) -> UserDescription:
    """RAT's description of the caller: what a RAT-served system writes, from the caller's preferences
    as shots, before its answer (`fspo.serve.serving.describe` says when it is refused)."""
    return await describe(request.app, principal.user_id, model, shots)


# --- admin ------------------------------------------------------------------------------------


@router.get("/v1/admin/users")
def admin_users(request: Request, principal: Principal = Depends(admin_principal)) -> UserList:
    store: Store = request.app.state.store
    counts = store.preference_counts()
    return UserList(data=[UserSummary.of(u, counts.get(u.user_id, 0)) for u in store.users()])


@router.get("/v1/admin/keys")
def admin_keys(
    request: Request, user_id: str | None = None, principal: Principal = Depends(admin_principal)
) -> KeyList:
    return KeyList(data=request.app.state.store.keys(user_id))


@router.post("/v1/admin/keys", status_code=201)
def admin_create_key(
    request: Request, body: NewKey, principal: Principal = Depends(admin_principal)
) -> CreatedKey:
    info, key = request.app.state.store.create_key(body.user_id, scope=body.scope, name=body.name)
    return CreatedKey(**dict(info), api_key=key)


@router.delete("/v1/admin/keys/{key_id}")
def admin_revoke_key(
    request: Request, key_id: str, principal: Principal = Depends(admin_principal)
) -> RevokedKey:
    if not request.app.state.store.revoke_key(key_id):
        raise APIError(404, f"key_id: no active key {key_id!r}", param="key_id", code="key_not_found")
    return RevokedKey(id=key_id)


@router.get("/v1/admin/events")
def admin_events(
    request: Request,
    user_id: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    principal: Principal = Depends(admin_principal),
) -> EventList:
    return EventList(data=request.app.state.store.events(user_id, limit=limit))


def create_app(
    store: Store,
    systems: Sequence[System],
    *,
    default_system: str | None = None,
    study: StudyConfig | None = None,
    limits: Limits = Limits(),
    decoding: Decoding = Decoding(),
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> FastAPI:
    """The serving app over `store` and the served `systems` (the first is the default unless named).

    `allowed_hosts`: the names a request's Host header may give (`fspo.serve.middleware.HostCheck`).

    `decoding` is the server's: its repetition controls apply to every system's answers, and each
    request's ``temperature``, ``top_p`` and ``seed`` replace its own (`fspo.serve.serving.prepare`)."""
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
    app.state.study_throttle = Throttle()
    app.state.limits = limits
    app.state.decoding = decoding
    app.state.generation_pool = pool
    install_error_handlers(app)
    # Each add wraps the ones before: CrashGuard innermost, SecurityHeaders outermost, so every answer
    # of the layers inside it (a 500, a 413, a refused Host) carries the headers.
    app.add_middleware(CrashGuard)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.add_middleware(SecurityHeaders)
    app.include_router(router)
    app.include_router(study_router)
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app
