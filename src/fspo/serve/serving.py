"""The handlers' shared part, from a request to an answer: which served system, which of the caller's
preferences are its shots, how its tokens are chosen, and where the generation runs. The completion
routes (`fspo.serve.completions`), the caller's description and the study all answer through here, so
a study's FSPO answer is exactly what ``POST /v1/completions`` gives the participant by default.

The decoding is the server's (`create_app`'s `decoding`: the repetition controls, the same for every
system) with the request's OpenAI fields (``temperature``, ``top_p``, ``seed``), so a served answer is
``fspo generate``'s for the same settings. ``n`` and ``best_of`` ask for several samples
(`fspo.serve.answerers.LocalAnswerer.choose`), within `Limits.max_samples`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from fspo.data.schema import Preference
from fspo.infer.generate import Decoding, Mode
from fspo.serve.answerers import Answer, AnswerRequest, Choices, System, samples_problem
from fspo.serve.errors import APIError, raise_generation_failure
from fspo.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FspoInfo,
    GenerationBody,
    UserDescription,
)
from fspo.serve.store import NewPreference, NotFound, Store

DEFAULT_MAX_TOKENS = 128  # an answer's tokens when the request names no max_tokens
# The question RAT's description is generated under (`describe`): the model writes the description
# before any answer, so the question only has to be a plausible one.
DESCRIPTION_QUESTION = "What kind of answers do I prefer?"


@dataclass(frozen=True)
class Limits:
    """Bounds on one request, each protecting the server's memory or time from a single caller."""

    max_body_bytes: int = 64 << 10  # larger request bodies get 413
    max_shots: int = 32  # shots in one episode (a prompt's length grows with them)
    max_messages: int = 64  # messages of one chat request (only the last is answered)
    max_batch: int = 100  # preferences added by one request
    max_page: int = 200  # preferences listed by one request
    max_samples: int = 16  # answers generated for one request (n, best_of): each costs a generation
    # A stored preference: each text (question, chosen, rejected) and its metadata as JSON. A shot much
    # longer than an answer would crowd every later prompt of its user out of the model's context.
    max_text_chars: int = 4000
    max_metadata_bytes: int = 4096
    max_preferences_per_user: int = 10000  # a user's stored preferences (delete some to add more)
    generation_threads: int = 4  # requests generating (or waiting for their model) at once


def forget_shots(app: FastAPI, user_id: str) -> None:
    """Drop `user_id`'s cached shot prefixes in every answerer: their preferences changed."""
    for answerer in {id(s.answerer): s.answerer for s in app.state.systems.values()}.values():
        answerer.forget(user_id)


def check_preference_limits(limits: Limits, items: Sequence[NewPreference], stored: int) -> None:
    """A 400 naming the field of the first of `items` over a per-field limit of `limits`, and a 409 when
    they would take their user (who has `stored` preferences) past `limits.max_preferences_per_user`."""
    for i, item in enumerate(items):
        for field in ("question", "chosen", "rejected"):
            size = len(getattr(item, field))
            if size > limits.max_text_chars:
                raise APIError(
                    400,
                    f"preferences[{i}].{field}: {size} characters, at most {limits.max_text_chars}",
                    param=field,
                )
        size = len(json.dumps(item.metadata, ensure_ascii=False).encode())
        if size > limits.max_metadata_bytes:
            raise APIError(
                400,
                f"preferences[{i}].metadata: {size} bytes as JSON, at most {limits.max_metadata_bytes}",
                param="metadata",
            )
    if stored + len(items) > limits.max_preferences_per_user:
        raise APIError(
            409,
            f"preferences: you have {stored} stored and at most {limits.max_preferences_per_user} are kept; "
            "delete some first",
            param="preferences",
            code="too_many_preferences",
        )


@dataclass(frozen=True)
class Prepared:
    """What a completion request resolves to: the system, the generation request, the shots' ids, and
    how many answers of how many samples (`n` of `best_of`; best_of 1: unranked samples)."""

    system: System
    request: AnswerRequest
    preference_ids: list[int]
    n: int = 1
    best_of: int = 1

    @property
    def several(self) -> bool:
        """Whether the request asks for more than one sample (`choose`, not `generate`)."""
        return max(self.n, self.best_of) > 1

    def fspo(self, answer: Answer, choices: Choices | None = None) -> FspoInfo:
        return FspoInfo(
            description=answer.description,
            shots_used=len(self.preference_ids),
            preference_ids=self.preference_ids,
            mode=str(self.request.mode),
            decoding=self.request.decoding,
            rewards=None if choices is None else choices.rewards,
            reference=None if choices is None else choices.reference,
        )


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
    limit = system.answerer.max_new_tokens_limit
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
        decoding=Decoding.of(
            "request",
            **{
                **app.state.decoding.model_dump(),
                "temperature": body.temperature,
                "top_p": body.top_p,
                "seed": body.seed or 0,
            },
        ),
        cache_owner=user_id,
    )
    return Prepared(system, request, ids, *_samples(limits, system, body, request))


def _samples(limits: Limits, system: System, body: GenerationBody, request: AnswerRequest) -> tuple[int, int]:
    """(n, best_of) of `body`, within the server's and the system's limits; a 400 naming the field."""
    n, best_of = body.n, body.best_of or 1
    if body.best_of is not None and body.best_of < n:  # an explicit best_of of 1 is no unranked request
        raise APIError(400, f"best_of: must be at least n ({n}), got {body.best_of}", param="best_of")
    own = system.answerer.max_samples
    cap = limits.max_samples if own is None else min(own, limits.max_samples)
    for field, value in (("n", n), ("best_of", best_of)):
        if value > cap:
            raise APIError(400, f"{field}: at most {cap} for model {system.name!r}, got {value}", param=field)
    problem = samples_problem(n, best_of, request.decoding, request.mode)
    if problem is None and max(n, best_of) > 1 and body.stream:
        problem = ("best_of" if best_of > 1 else "n", "several samples are not streamed (ask stream: false)")
    if problem is not None:
        field, why = problem
        raise APIError(400, f"{field}: {why}", param=field)
    return n, best_of


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
        return await loop.run_in_executor(app.state.generation_pool, system.answerer.answer, request)
    except Exception as err:
        raise_generation_failure(system.name, err)


async def choose(app: FastAPI, prepared: Prepared) -> Choices:
    """The `prepared.n` answers of `prepared.best_of` samples, generated in the generation pool too."""
    loop = asyncio.get_running_loop()
    system = prepared.system
    work = functools.partial(system.answerer.choose, prepared.request, prepared.n, prepared.best_of)
    try:
        return await loop.run_in_executor(app.state.generation_pool, work)
    except Exception as err:
        raise_generation_failure(system.name, err)


async def describe(app: FastAPI, user_id: str, model: str | None, shots: int | None) -> UserDescription:
    """RAT's description of `user_id`: what system `model` (served in RAT mode) writes before its answer,
    from the user's newest `shots` preferences. Refused (naming why) where there is nothing to report:
    no preferences yet (409), a system not served in RAT mode (it writes no description), no shots
    (``shots=0`` or a zero-shot system: nothing of the user's to describe)."""
    if not await run_in_threadpool(app.state.store.count_preferences, user_id):
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
    prepared = await run_in_threadpool(prepare, app, user_id, body)
    system = prepared.system
    if not prepared.preference_ids:
        why = "shots=0" if shots == 0 else f"model {system.name!r} takes no shots"
        raise APIError(
            400, f"shots: a description needs at least one of your preferences ({why})", param="shots"
        )
    # The whole budget: the description comes first, and the answer after it must not cut it short.
    req = dataclasses.replace(prepared.request, max_new_tokens=system.answerer.max_new_tokens_limit)
    answer = await generate(app, system, req)
    return UserDescription(
        description=answer.description,
        model=system.name,
        shots_used=len(prepared.preference_ids),
        preference_ids=prepared.preference_ids,
    )
