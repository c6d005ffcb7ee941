"""The blind study's numbers (`report`): FSPO's win rate over the baseline (ties count half), a 95%
interval from a bootstrap that resamples *participants*, since one person's votes are not independent
of each other (a person who likes FSPO's style likes it on every question), the share of votes for the
left side (the position-bias check), and results per question. Each participant counts once, however
many times they came back (`fspo.serve.study`: a returning participant resumes as themselves).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel

from fspo.core.errors import UserError


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
