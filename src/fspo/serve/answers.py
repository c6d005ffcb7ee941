"""From a request to an answer: which served system, which of the caller's preferences are its shots,
and where the generation runs. The completion routes and the study both answer through here, so a
study's FSPO answer is exactly what ``POST /v1/completions`` gives the participant by default.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, NoReturn

from fastapi import FastAPI

from fspo.data.schema import Preference
from fspo.infer.generate import Mode
from fspo.serve.engine import Answer, AnswerRequest, System
from fspo.serve.errors import APIError
from fspo.serve.schemas import ChatCompletionRequest, CompletionRequest, GenerationBody
from fspo.serve.store import NotFound, Store

logger = logging.getLogger("fspo.serve")

DEFAULT_MAX_TOKENS = 128  # an answer's tokens when the request names no max_tokens


@dataclass(frozen=True)
class Limits:
    """Bounds on one request, each protecting the server's memory or time from a single caller."""

    max_body_bytes: int = 64 << 10  # larger request bodies get 413
    max_shots: int = 32  # shots in one episode (a prompt's length grows with them)
    max_messages: int = 64  # messages of one chat request (only the last is answered)
    max_batch: int = 100  # preferences added by one request
    max_page: int = 200  # preferences listed by one request
    generation_threads: int = 4  # requests generating (or waiting for their model) at once


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


def prepare(app: FastAPI, user_id: str, body: ChatCompletionRequest | CompletionRequest) -> Prepared:
    """Resolve a completion request for `user_id` (blocking: reads the store)."""
    limits: Limits = app.state.limits
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > limits.max_messages:
        raise APIError(400, f"messages: at most {limits.max_messages}", param="messages")
    systems: dict[str, System] = app.state.systems
    name = body.model or app.state.default_system
    if name not in systems:
        raise APIError(
            404,
            f"model: {name!r} is not served here (served: {', '.join(systems)})",
            param="model",
            code="model_not_found",
        )
    system = systems[name]
    limit = system.backend.max_new_tokens_limit
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > limit:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{field}: at most {limit} for model {name!r}, got {asked}", param=field)
    shots, ids = _shots(app.state.store, limits, user_id, system, body)
    request = AnswerRequest(
        shots=shots,
        question=body.question,
        mode=Mode(body.mode) if body.mode else system.served_mode,
        max_new_tokens=asked or min(DEFAULT_MAX_TOKENS, limit),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed or 0,
        cache_owner=user_id,
    )
    return Prepared(system, request, ids)


def _shots(
    store: Store, limits: Limits, user_id: str, system: System, body: GenerationBody
) -> tuple[list[Preference], list[int]]:
    """The caller's shots (oldest first, as episodes order them) and their store ids."""
    # A system's shot count is its maximum: a zero-shot baseline stays zero-shot whatever is asked.
    cap = limits.max_shots if system.shots is None else min(system.shots, limits.max_shots)
    if body.preference_ids is not None:
        if len(body.preference_ids) > cap:
            raise APIError(
                400, f"preference_ids: at most {cap} for model {system.name!r}", param="preference_ids"
            )
        try:
            stored = store.shots(user_id, ids=body.preference_ids)
        except NotFound as err:
            raise APIError(404, str(err), param="preference_ids", code="preference_not_found") from None
    else:
        if body.shots is not None and body.shots > limits.max_shots:
            raise APIError(400, f"shots: at most {limits.max_shots}", param="shots")
        stored = store.shots(user_id, n=cap if body.shots is None else min(body.shots, cap))
    return [p.record() for p in stored], [p.id for p in stored]


async def generate(app: FastAPI, system: System, request: AnswerRequest) -> Answer:
    """`system`'s answer, generated in the app's generation pool (so requests waiting for the model
    never hold the threads that database-only requests need)."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(app.state.generation_pool, system.backend.answer, request)
    except Exception as err:
        raise_failure(system, err)


def raise_failure(system: System, err: Exception) -> NoReturn:
    """Raise a generation's failure `err` as the response's error: the 502 of `backend_failure`, else
    `err` itself (a `UserError` becomes a 400 naming its field, anything else a logged 500, by the
    error handlers)."""
    failure = backend_failure(system, err)
    if failure is None:
        raise err
    raise failure from err


def backend_failure(system: System, err: Exception) -> APIError | None:
    """A 502 naming `system` when `err` is its remote server's failure (unreachable, timed out, an error
    status, a stream cut off), so the caller learns it was the backend and not their request or this
    server; None for any other error.

    The details (the backend's address, its status and body) go to the server's log only: they describe
    the deployment, which is none of the caller's business, and a backend's error body may echo anything.
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
    logger.warning("backend %r%s failed: %s", system.name, where, str(err) or type(err).__name__)
    return APIError(502, f"backend {system.name!r} failed (see the server log)", code="backend_error")
