"""The blind study of the paper, served: people label a few pairs, then choose between two hidden systems.

A participant joins with the study's code (`POST /v1/study/join`) and gets a user of their own (marked
as a participant) and an API key; the other study routes refuse any other key (403), so every trial
and vote comes from someone who joined. They label `label_count` pairs of the study's bank
(`GET /v1/study/pairs`; each label is a preference posted to `/v1/users/me/preferences`, so it is
stored like any other and becomes a shot). Then, for `trials_per_participant` held-out questions,
`GET /v1/study/next` shows FSPO's answer, written with the participant's own preferences as shots,
beside the baseline's, on sides drawn per trial; the participant votes left, right or tie
(`POST /v1/study/trials/{id}/vote`). The database holds one trial per (participant, question) and
takes one vote per trial (`Store.create_trial` / `Store.vote`), so a double click, a replayed request
or a second tab cannot vote twice.

Every random draw (which pairs, which sides of a pair, which questions, which side FSPO is on) is a
function of (study seed, participant, item) alone: a participant's study is the same whatever the
order in which people arrive, and the server keeps no state beyond the database.

`fspo.serve.study_report` turns the votes into the paper's numbers.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from fspo.core.errors import UserError
from fspo.core.rng import seeded_rng
from fspo.data.schema import Preference
from fspo.serve.auth import principal_of
from fspo.serve.errors import APIError
from fspo.serve.protocol import INT64_MAX, Body, CompletionRequest, Response, Text
from fspo.serve.serving import forget_shots, generate, prepare
from fspo.serve.store import Conflict, Label, Principal, Trial
from fspo.serve.store.participants import code_hash

Choice = Literal["left", "right", "tie"]


# ------------------------------------------------------------------------------------------- config
class StudyConfig(BaseModel):
    """A study, as its YAML/JSON file gives it (`StudyConfig.load`); relative paths are from its folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str = Field(min_length=1, description="The sign-in code participants type.")
    pairs: Path = Field(description="Preference records (JSONL/JSON/Parquet): the bank people label.")
    label_count: int = Field(ge=1, description="Pairs each participant labels.")
    questions: Path = Field(description="Held-out questions: a .txt (one a line) or records with 'question'.")
    trials_per_participant: int = Field(ge=1)
    fspo: str = Field("fspo", min_length=1, description="The served system whose shots are the labels.")
    baseline: str = Field(min_length=1, description="The served system FSPO is compared with.")
    seed: int = 0
    max_new_tokens: int = Field(128, ge=1, description="Answer length for both systems (capped by each).")
    max_participants: int | None = Field(None, ge=1, description="Seats: joins past this many are refused.")
    invites: Path | None = Field(
        None,
        description="One-time invite codes, one a line (`fspo study invites` writes them): each lets one "
        "person join, once; with them the study code alone is not enough.",
    )

    @model_validator(mode="after")
    def _two_systems(self) -> StudyConfig:
        if self.fspo == self.baseline:
            raise ValueError(f"fspo and baseline are both {self.fspo!r}: a study compares two systems")
        return self

    @classmethod
    def load(cls, file: str | Path) -> StudyConfig:
        """Read, validate and load the bank and questions of a study file; every problem a `UserError`."""
        from fspo.core.files import read_fields

        file = Path(file)
        values = read_fields(file)
        for name in ("pairs", "questions", "invites"):
            if isinstance(values.get(name), str):
                values[name] = str(file.parent / values[name])  # an absolute path stays as it is
        try:
            study = cls.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'study'}: {e['msg'].removeprefix('Value error, ')}"
                for e in err.errors()
            )
            raise UserError(f"study file {str(file)!r}: {problems}") from None
        study.check()
        return study

    @cached_property
    def bank(self) -> list[Preference]:
        """The pairs people label (read once)."""
        from fspo.data.io import read_records

        return read_records(self.pairs, Preference)

    @cached_property
    def question_bank(self) -> list[str]:
        """The held-out questions, duplicates dropped (a participant must never see one twice)."""
        from fspo.data.io import iter_rows

        path = Path(self.questions)
        if not path.is_file():
            raise UserError(f"study questions: {str(path)!r} does not exist")
        if path.suffix == ".txt":
            texts = path.read_text(encoding="utf-8").splitlines()
        else:
            texts = []
            for where, row in iter_rows(path):
                if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                    raise UserError(f"{where}: question: each record needs a 'question' text")
                texts.append(row["question"])
        questions = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
        if not questions:
            raise UserError(f"study questions: {str(path)!r} holds no question")
        return questions

    @cached_property
    def invite_hashes(self) -> frozenset[str] | None:
        """The stored form (`code_hash`) of every invite code, or None for a study without invites."""
        if self.invites is None:
            return None
        if not self.invites.is_file():
            raise UserError(f"study invites: {str(self.invites)!r} does not exist")
        codes = [line.strip() for line in self.invites.read_text(encoding="utf-8").splitlines()]
        hashes = frozenset(code_hash(c) for c in codes if c and not c.startswith("#"))
        if not hashes:
            raise UserError(f"study invites: {str(self.invites)!r} holds no invite code")
        return hashes

    def check(self) -> None:
        """Load the bank, the questions and the invites and check that every participant can be served."""
        self.invite_hashes  # noqa: B018 - read (and checked) now, not at the first join
        if len(self.bank) < self.label_count:
            raise UserError(
                f"study label_count {self.label_count}: the bank {self.pairs} has {len(self.bank)} pairs"
            )
        if len(self.question_bank) < self.trials_per_participant:
            raise UserError(
                f"study trials_per_participant {self.trials_per_participant}: {self.questions} has "
                f"{len(self.question_bank)} distinct questions, and no participant sees one twice"
            )

    def check_systems(self, served: Iterable[str]) -> None:
        """A `UserError` unless both of the study's systems are served (call when the app is created)."""
        served = set(served)
        for field in ("fspo", "baseline"):
            name = getattr(self, field)
            if name not in served:
                raise UserError(
                    f"study {field}: system {name!r} is not served (served: {', '.join(sorted(served))})"
                )

    # The draws: functions of (seed, participant, item) only.
    def pairs_for(self, participant: str) -> list[dict[str, Any]]:
        """The participant's pairs, in the order they are asked, each with its two answers in a drawn
        order: `label_count` distinct pairs of the bank, then as many spares (as the bank allows) for
        the pairs they answer "no preference", which store no label."""
        rng = seeded_rng(self.seed, participant, "pairs")
        drawn = rng.sample(range(len(self.bank)), self.label_count)
        shown = [self._shown(i, rng) for i in drawn]
        spares_rng = seeded_rng(self.seed, participant, "spare pairs")
        rest = sorted(set(range(len(self.bank))) - set(drawn))
        spares = spares_rng.sample(rest, min(self.label_count, len(rest)))
        return shown + [self._shown(i, spares_rng) for i in spares]

    def _shown(self, i: int, rng: Any) -> dict[str, Any]:
        pair = self.bank[i]
        a, b = (pair.chosen, pair.rejected) if rng.random() < 0.5 else (pair.rejected, pair.chosen)
        return {"pair_id": i, "question": pair.question, "a": a, "b": b}

    def questions_for(self, participant: str) -> list[str]:
        """The participant's `trials_per_participant` questions, distinct, in the order they are asked."""
        rng = seeded_rng(self.seed, participant, "questions")
        return [
            self.question_bank[i]
            for i in rng.sample(range(len(self.question_bank)), self.trials_per_participant)
        ]

    def fspo_on_left(self, participant: str, question: str) -> bool:
        return seeded_rng(self.seed, participant, "sides", question).random() < 0.5


# ------------------------------------------------------------------------------------------- routes
router = APIRouter(prefix="/v1/study", tags=["study"])


class JoinBody(Body):
    code: Text = Field(min_length=1, max_length=256)
    invite: Text | None = Field(None, min_length=1, max_length=256)


class ResumeBody(Body):
    resume_code: Text = Field(min_length=1, max_length=256)


class LabelBody(Body):
    pair_id: int = Field(ge=0, le=INT64_MAX)
    choice: Label  # the answer preferred, or "none": no preference


class VoteBody(Body):
    choice: Choice


class Joined(Response):
    api_key: str  # shown this once
    participant: str
    resume_code: str | None = None  # at join only, shown this once: how the participant comes back


class StudyPair(Response):
    """A pair of the bank to label, its two answers in a drawn order (never which was chosen)."""

    pair_id: int
    question: str
    a: str
    b: str


class StudyState(Response):
    """Where a participant is: labeling (`pair` is the next pair to label) or comparing."""

    labeled: int  # pairs with a preferred answer: the participant's shots
    skipped: int  # pairs answered "no preference"
    label_count: int  # labels the study asks for
    pair: StudyPair | None  # the next pair to label; None once labeling is over
    trials_voted: int
    trials_total: int


class ShownTrial(Response):
    """What the page sees of a trial: never the systems' names."""

    trial_id: int
    question: str
    left: str
    right: str
    done: Literal[False] = False
    index: int  # 1-based, of `total`
    total: int

    @classmethod
    def of(cls, trial: Trial, index: int, total: int) -> ShownTrial:
        return cls(
            trial_id=trial.id,
            question=trial.question,
            left=trial.left_answer,
            right=trial.right_answer,
            index=index,
            total=total,
        )


class StudyDone(Response):
    done: Literal[True] = True
    total: int


class Voted(Response):
    trial_id: int
    vote: Choice


def _study(request: Request) -> StudyConfig:
    study = request.app.state.study
    if study is None:
        raise APIError(
            404, "this server runs no study (start it with `fspo serve --study FILE`)", code="no_study"
        )
    return study


def participant_principal(request: Request, principal: Principal = Depends(principal_of)) -> Principal:
    """The caller, who must hold a participant's key (made by ``POST /v1/study/join`` or ``/resume``).

    Any other key is refused (403): the study's trials and votes must come only from people who joined
    with the code, labelled the study's pairs and were shown blind answers, or the report would mix in
    answers chosen by anyone holding a key. A participant's key reaches nothing else
    (`fspo.serve.auth.user_principal`), so no participant can ask a compared system by name.
    """
    _study(request)
    if principal.scope != "study":
        raise APIError(
            403, "only study participants (joined with the code) take the study", code="not_a_participant"
        )
    return principal


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("/join")
def join(body: JoinBody, request: Request) -> Joined:
    """A new participant: a user of their own, a participant's key and a resume code, both shown this once.

    Wrong codes are slowed down per client (429 once `Throttle` says so); a study with invites needs one
    of them, once; a study with seats refuses joins once they are taken."""
    study, throttle = _study(request), request.app.state.study_throttle
    client = _client(request)
    throttle.check(client)
    invites = study.invite_hashes
    if not hmac.compare_digest(body.code.encode(), study.code.encode()):
        throttle.failed(client)
        raise APIError(403, "wrong study code", param="code", code="wrong_study_code")
    if invites is not None and (body.invite is None or code_hash(body.invite) not in invites):
        throttle.failed(client)
        why = "this study needs your invite code" if body.invite is None else "no such invite code"
        raise APIError(403, why, param="invite", code="wrong_invite")
    if invites is None and body.invite is not None:
        raise APIError(400, "invite: this study has no invites", param="invite")
    try:
        participant, key, resume = request.app.state.store.join_study(
            invite=body.invite, max_participants=study.max_participants
        )
    except Conflict as err:
        code = "study_full" if err.field == "code" else "invite_used"
        raise APIError(409, str(err), param=err.field, code=code) from None
    return Joined(api_key=key, participant=participant.user_id, resume_code=resume)


@router.post("/resume")
def resume(body: ResumeBody, request: Request) -> Joined:
    """A new key for the participant of a resume code: they go on where they stopped, as themselves."""
    _study(request)
    throttle, client = request.app.state.study_throttle, _client(request)
    throttle.check(client)
    found = request.app.state.store.resume_study(body.resume_code)
    if found is None:
        throttle.failed(client)
        raise APIError(
            403, "no participant has this resume code", param="resume_code", code="wrong_resume_code"
        )
    participant, key = found
    return Joined(api_key=key, participant=participant.user_id)


@router.get("/pairs")
def pairs(request: Request, principal: Principal = Depends(participant_principal)) -> list[StudyPair]:
    """Every pair this participant may be asked to label, in order (spares last)."""
    return [StudyPair(**p) for p in _study(request).pairs_for(principal.user_id)]


@router.get("/state")
def state(request: Request, principal: Principal = Depends(participant_principal)) -> StudyState:
    """Where the participant is: the next pair to label, or how far the comparison has come."""
    return _state(request, principal.user_id)


@router.post("/labels")
def label(
    body: LabelBody, request: Request, principal: Principal = Depends(participant_principal)
) -> StudyState:
    """The participant's label of one of their pairs: the answer they prefer (stored as their preference,
    a shot of FSPO's) or "none". Only the pair `state` shows next is taken (409 for another), so the
    labels are the pairs the study drew, in its order."""
    study, store, participant = _study(request), request.app.state.store, principal.user_id
    now = _state(request, participant)
    if now.pair is None or now.pair.pair_id != body.pair_id:
        expected = "labeling is over" if now.pair is None else f"the next pair is {now.pair.pair_id}"
        raise APIError(409, f"pair_id: {expected}, not {body.pair_id}", param="pair_id", code="not_next_pair")
    pair = study.bank[body.pair_id]
    preference = None
    if body.choice != "none":
        chosen = now.pair.a if body.choice == "a" else now.pair.b
        rejected = now.pair.b if body.choice == "a" else now.pair.a
        preference = pair.model_copy(update={"chosen": chosen, "rejected": rejected, "user_id": participant})
    store.add_label(participant, body.pair_id, body.choice, preference)
    forget_shots(request.app, participant)
    return _state(request, participant)


def _state(request: Request, participant: str) -> StudyState:
    study, store = _study(request), request.app.state.store
    labels = store.labels(participant)
    done = {lab.pair_id for lab in labels}
    labeled = sum(lab.choice != "none" for lab in labels)
    todo = [p for p in study.pairs_for(participant) if p["pair_id"] not in done]
    trials = store.trials(participant)
    return StudyState(
        labeled=labeled,
        skipped=len(labels) - labeled,
        label_count=study.label_count,
        pair=StudyPair(**todo[0]) if todo and labeled < study.label_count else None,
        trials_voted=sum(t.vote is not None for t in trials),
        trials_total=study.trials_per_participant,
    )


@router.get("/next")
async def next_trial(
    request: Request, principal: Principal = Depends(participant_principal)
) -> ShownTrial | StudyDone:
    """The participant's unvoted trial, else a new one for their next question, else ``done``.

    A new trial needs the labeling done (409 ``no_labels`` before that): FSPO's side answers from the
    participant's labels, so an early trial would compare answers personalized from fewer of them.

    Database work runs in the default threadpool, generation in the app's generation pool, as the
    completion routes do, so participants waiting for answers never hold the threads others need.
    """
    study, store, participant = _study(request), request.app.state.store, principal.user_id
    trials = await run_in_threadpool(store.trials, participant)
    total = study.trials_per_participant
    for trial in trials:
        if trial.vote is None:
            return ShownTrial.of(trial, len(trials), total)
    asked = {t.question for t in trials}
    todo = [q for q in study.questions_for(participant) if q not in asked]
    if len(trials) >= total or not todo:
        return StudyDone(total=total)
    if (await run_in_threadpool(_state, request, participant)).pair is not None:
        raise APIError(
            409, "label the study's pairs first: FSPO answers from your own preferences", code="no_labels"
        )
    question = todo[0]
    fspo_left = study.fspo_on_left(participant, question)
    left, right = (study.fspo, study.baseline) if fspo_left else (study.baseline, study.fspo)
    left_answer, right_answer = await asyncio.gather(
        _answer(request, study, left, participant, question),
        _answer(request, study, right, participant, question),
    )
    try:
        trial = await run_in_threadpool(
            store.create_trial, participant, question, left, right, left_answer, right_answer
        )
    except Conflict:  # a concurrent request (a second tab) made it first: show that one
        trial = next(t for t in await run_in_threadpool(store.trials, participant) if t.question == question)
    return ShownTrial.of(trial, len(trials) + 1, total)


@router.post("/trials/{trial_id}/vote")
def vote(
    body: VoteBody,
    request: Request,
    trial_id: int = PathParam(ge=1, le=INT64_MAX),
    principal: Principal = Depends(participant_principal),
) -> Voted:
    """One vote per trial: the store refuses a second (Conflict: 409) and another's trial (NotFound: 404)."""
    trial = request.app.state.store.vote(principal.user_id, trial_id, body.choice)
    return Voted(trial_id=trial.id, vote=trial.vote)


async def _answer(request: Request, study: StudyConfig, name: str, participant: str, question: str) -> str:
    """System `name`'s answer to `question` for `participant`: what ``POST /v1/completions`` gives them
    by default (their newest preferences as shots, up to the system's number; the system's mode), at
    the study's length and seed. Stored as said, even empty: the offline evaluation judges it so too."""
    app = request.app
    system = app.state.systems[name]
    body = CompletionRequest(
        prompt=question,
        model=name,
        max_tokens=min(study.max_new_tokens, system.answerer.max_new_tokens_limit),
        seed=study.seed,
    )
    prepared = await run_in_threadpool(prepare, app, participant, body)
    return (await generate(app, system, prepared.request)).text
