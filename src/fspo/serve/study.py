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

`report` turns the votes into the paper's numbers: FSPO's win rate over the baseline (ties count
half), a 95% interval from a bootstrap that resamples *participants*, since one person's votes are
not independent of each other (a person who likes FSPO's style likes it on every question), the
share of votes for the left side (the position-bias check), and results per question.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import secrets
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from fspo.core.errors import UserError
from fspo.core.rng import seeded_rng
from fspo.data.schema import Preference
from fspo.serve.auth import user_principal
from fspo.serve.errors import APIError
from fspo.serve.protocol import INT64_MAX, Body, CompletionRequest, Response
from fspo.serve.serving import generate, prepare
from fspo.serve.store import Conflict, Principal, Trial

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
        for name in ("pairs", "questions"):
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

    def check(self) -> None:
        """Load the bank and the questions and check that every participant can be served in full."""
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
        """`label_count` distinct pairs of the bank, each with its two answers in a drawn order."""
        rng = seeded_rng(self.seed, participant, "pairs")
        shown = []
        for i in rng.sample(range(len(self.bank)), self.label_count):
            pair = self.bank[i]
            a, b = (pair.chosen, pair.rejected) if rng.random() < 0.5 else (pair.rejected, pair.chosen)
            shown.append({"pair_id": i, "question": pair.question, "a": a, "b": b})
        return shown

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
    code: str = Field(min_length=1, max_length=256)


class VoteBody(Body):
    choice: Choice


class Joined(Response):
    api_key: str  # shown this once
    participant: str


class StudyPair(Response):
    """A pair of the bank to label, its two answers in a drawn order (never which was chosen)."""

    pair_id: int
    question: str
    a: str
    b: str


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


# The user metadata that marks a participant: set at join, the one way into the study's routes.
PARTICIPANT = "study"


def participant_principal(request: Request, principal: Principal = Depends(user_principal)) -> Principal:
    """The caller, who must be a participant (a user made by ``POST /v1/study/join``).

    Any other user key is refused (403): the study's trials and votes must come only from people who
    joined with the code, labelled the study's pairs and were shown blind answers, or the report would
    mix in answers chosen by anyone holding a key.
    """
    _study(request)
    user = request.app.state.store.get_user(principal.user_id)
    if user is None or user.metadata.get(PARTICIPANT) is not True:
        raise APIError(
            403, "only study participants (joined with the code) take the study", code="not_a_participant"
        )
    return principal


@router.post("/join")
def join(body: JoinBody, request: Request) -> Joined:
    """A new participant: a user of their own and a user-scope key, shown this once."""
    study = _study(request)
    if not hmac.compare_digest(body.code.encode(), study.code.encode()):
        raise APIError(403, "wrong study code", param="code", code="wrong_study_code")
    store = request.app.state.store
    participant = f"study-{secrets.token_hex(8)}"
    store.ensure_user(participant, metadata={PARTICIPANT: True})
    _, key = store.create_key(participant, "user", name="study")
    return Joined(api_key=key, participant=participant)


@router.get("/pairs")
def pairs(request: Request, principal: Principal = Depends(participant_principal)) -> list[StudyPair]:
    """The pairs this participant labels; each label goes to ``POST /v1/users/me/preferences``."""
    return [StudyPair(**p) for p in _study(request).pairs_for(principal.user_id)]


@router.get("/next")
async def next_trial(
    request: Request, principal: Principal = Depends(participant_principal)
) -> ShownTrial | StudyDone:
    """The participant's unvoted trial, else a new one for their next question, else ``done``.

    A new trial needs at least one of the participant's preferences (409 ``no_labels`` before that):
    FSPO's side answers from them, so without any the trial would compare two unpersonalized answers.

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
    if not await run_in_threadpool(store.count_preferences, participant):
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


# ------------------------------------------------------------------------------------------- report
class TrialLike(Protocol):
    participant: str
    question: str
    left_system: str
    right_system: str
    vote: str | None


class QuestionResult(BaseModel):
    question: str
    n: int
    fspo_wins: int
    ties: int
    baseline_wins: int
    win_rate: float


class StudyReport(BaseModel):
    """The study's numbers. `left_share` is the share of *decisive* votes (ties excluded) for the left
    side: about 0.5 when position does not sway people, whatever the systems' win rate, since FSPO's side
    is drawn per trial."""

    fspo: str
    baseline: str
    participants: int
    trials: int  # voted trials of the two systems
    unvoted: int
    fspo_wins: int
    ties: int
    baseline_wins: int
    win_rate: float  # (fspo_wins + ties / 2) / trials
    ci_low: float | None  # None with a single participant: there is nothing to resample
    ci_high: float | None
    confidence: float
    interval: str  # how the interval was computed
    resamples: int
    seed: int
    left_votes: int
    right_votes: int
    left_share: float | None  # None when every vote was a tie
    per_question: list[QuestionResult]


def report(
    store: Any, fspo: str, baseline: str, *, resamples: int = 10000, seed: int = 0, confidence: float = 0.95
) -> StudyReport:
    """The report of every trial in `store` between systems `fspo` and `baseline`."""
    return summarize_trials(
        store.trials(), fspo, baseline, resamples=resamples, seed=seed, confidence=confidence
    )


def summarize_trials(
    trials: Sequence[TrialLike],
    fspo: str,
    baseline: str,
    *,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> StudyReport:
    """`report` on trials given (store `Trial`s or anything with their fields); trials of other systems
    are left out. `UserError` when there is no such trial or none has a vote yet."""
    mine = [t for t in trials if {t.left_system, t.right_system} == {fspo, baseline}]
    if not mine:
        found = sorted({f"{t.left_system} vs {t.right_system}" for t in trials})
        raise UserError(
            f"no study trials of {fspo!r} vs {baseline!r}"
            + (f" (the trials hold: {', '.join(found)})" if found else "")
        )
    voted = [t for t in mine if t.vote is not None]
    if not voted:
        raise UserError(f"{len(mine)} study trials of {fspo!r} vs {baseline!r}, but none has a vote yet")
    scores = [_fspo_score(t, fspo) for t in voted]
    by_participant: dict[str, list[float]] = defaultdict(list)
    by_question: dict[str, list[float]] = defaultdict(list)
    for t, s in zip(voted, scores, strict=True):
        by_participant[t.participant].append(s)
        by_question[t.question].append(s)
    low, high = participant_interval(
        [sum(v) for v in by_participant.values()],
        [len(v) for v in by_participant.values()],
        resamples=resamples,
        seed=seed,
        confidence=confidence,
    )
    left = sum(t.vote == "left" for t in voted)
    right = sum(t.vote == "right" for t in voted)
    return StudyReport(
        fspo=fspo,
        baseline=baseline,
        participants=len(by_participant),
        trials=len(voted),
        unvoted=len(mine) - len(voted),
        fspo_wins=sum(s == 1.0 for s in scores),
        ties=sum(s == 0.5 for s in scores),
        baseline_wins=sum(s == 0.0 for s in scores),
        win_rate=sum(scores) / len(scores),
        ci_low=None if math.isnan(low) else low,
        ci_high=None if math.isnan(high) else high,
        confidence=confidence,
        interval="percentile bootstrap over participants (a resample draws people with all their trials)",
        resamples=resamples,
        seed=seed,
        left_votes=left,
        right_votes=right,
        left_share=left / (left + right) if left + right else None,
        per_question=[
            QuestionResult(
                question=q,
                n=len(v),
                fspo_wins=sum(s == 1.0 for s in v),
                ties=sum(s == 0.5 for s in v),
                baseline_wins=sum(s == 0.0 for s in v),
                win_rate=sum(v) / len(v),
            )
            for q, v in sorted(by_question.items())
        ],
    )


def _fspo_score(trial: TrialLike, fspo: str) -> float:
    """1 when the vote went to FSPO's side, 0 to the baseline's, 0.5 for a tie."""
    if trial.vote == "tie":
        return 0.5
    winner = trial.left_system if trial.vote == "left" else trial.right_system
    return 1.0 if winner == fspo else 0.0


def participant_interval(
    score_sums: Sequence[float],
    counts: Sequence[int],
    *,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled win rate sum(scores) / sum(trials), resampling people.

    Participant i brings `score_sums[i]` (wins + ties/2) over `counts[i]` trials; a resample draws
    participants with replacement, each with all their trials, so the interval is as wide as the
    disagreement *between people* makes it, not as narrow as counting every vote as independent would.
    With one participant there is nothing to resample: (nan, nan).
    """
    import numpy as np
    from scipy import stats

    s, n = np.asarray(score_sums, dtype=float), np.asarray(counts, dtype=float)
    if len(s) < 2:
        return (math.nan, math.nan)
    rates = s / n
    if np.all(rates == rates[0]):  # every resample gives the same rate
        return (float(rates[0]), float(rates[0]))

    def pooled(s: Any, n: Any, axis: int = -1) -> Any:
        return s.sum(axis=axis) / n.sum(axis=axis)

    res = stats.bootstrap(
        (s, n),
        pooled,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))
