"""Win rates: how often system A's answer beats system B's for the same user and question.

Generations are paired by ``episode_id`` (the same user, shots and question), each pair is judged
(`Judge.prefer` -> probability that A wins), and the win rate is the mean of those probabilities:
with a 0/0.5/1 judge that is wins + ties/2 over n, the paper's convention. The confidence interval
is Wilson's on that half-counted total (see `fspo.eval.stats`). Results are given for all pairs and,
when the generations carry their split, for seen and unseen users separately.

Pairing is strict: a pair missing from either file, a question or user that differs between the two
files, or a user missing from the users file is a `DataError` naming file and record, because a
silently shrunken or mismatched comparison produces a confident wrong number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fspo.core.errors import DataError, UserError
from fspo.core.files import atomic_write_json
from fspo.data.schema import User
from fspo.eval.judges import Judge, make_judge, prefer_many
from fspo.eval.readers import read_generations, users_by_id
from fspo.eval.stats import wilson_interval

SPLIT_NAMES = {"test_seen": "seen", "test_unseen": "unseen"}


class WinRate(BaseModel):
    """One cell of the results table: `system` vs `opponent`, on `split`, by `judge`."""

    model_config = ConfigDict(frozen=True)

    system: str
    opponent: str
    judge: str
    split: str  # "all", "seen", "unseen" (or a split name the generations carry)
    win_rate: float
    ci_low: float
    ci_high: float
    n: int
    wins: int = 0
    ties: int = 0
    losses: int = 0
    confidence: float = 0.95


def summarize(
    scores: Sequence[float], system: str, opponent: str, judge: str, split: str, confidence: float = 0.95
) -> WinRate:
    """A `WinRate` from per-pair scores (probability that `system` wins; 0.5 = tie)."""
    n = len(scores)
    total = float(sum(scores))
    low, high = wilson_interval(total, n, confidence)
    return WinRate(
        system=system,
        opponent=opponent,
        judge=judge,
        split=split,
        win_rate=total / n if n else float("nan"),
        ci_low=low,
        ci_high=high,
        n=n,
        wins=sum(s > 0.5 for s in scores),
        ties=sum(s == 0.5 for s in scores),
        losses=sum(s < 0.5 for s in scores),
        confidence=confidence,
    )


@dataclass
class WinRateResult:
    results: list[WinRate]
    pairs: list[dict[str, Any]]
    usage: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the judge's, for the console (not the file)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "fspo.winrate",
            "files": self.files,
            "results": [r.model_dump() for r in self.results],
            "usage": self.usage,
            "pairs": self.pairs,
        }


def _system_name(rows: list[tuple[str, dict]], path: str | Path) -> str:
    names = {row.get("system") for _, row in rows}
    if len(names) == 1 and isinstance(next(iter(names)), str):
        return str(next(iter(names)))
    return Path(path).stem


def pair_generations(
    a_path: str | Path, b_path: str | Path, users: dict[str, User], users_path: str | Path = "users"
) -> tuple[list[dict[str, Any]], str, str]:
    """Paired rows {episode_id, user, question, split, a, b}, plus the two system names."""
    a_rows, b_rows = read_generations(a_path), read_generations(b_path)
    a_by = {row["episode_id"]: (where, row) for where, row in a_rows}
    b_by = {row["episode_id"]: (where, row) for where, row in b_rows}
    only_a = sorted(set(a_by) - set(b_by))
    only_b = sorted(set(b_by) - set(a_by))
    problems = [f"{a_by[e][0]}: episode_id: {e!r} has no generation in {b_path}" for e in only_a]
    problems += [f"{b_by[e][0]}: episode_id: {e!r} has no generation in {a_path}" for e in only_b]
    pairs = []
    for eid, (where_a, ra) in a_by.items():
        if eid not in b_by:
            continue
        where_b, rb = b_by[eid]
        if ra["question"].strip() != rb["question"].strip():
            problems.append(f"{where_a}: question: differs from {where_b} for episode {eid!r}")
        if ra["user_id"] != rb["user_id"]:
            problems.append(f"{where_a}: user_id: {ra['user_id']!r} but {where_b} has {rb['user_id']!r}")
        if ra["user_id"] not in users:
            problems.append(f"{where_a}: user_id: {ra['user_id']!r} is not in {users_path}")
        split = ra.get("split") or rb.get("split")
        pairs.append(
            {
                "episode_id": eid,
                "user_id": ra["user_id"],
                "question": ra["question"],
                "split": SPLIT_NAMES.get(split, split) if split else None,
                "a": ra["answer"],
                "b": rb["answer"],
            }
        )
    if problems:
        raise DataError(f"cannot pair {a_path} with {b_path}", problems)
    return pairs, _system_name(a_rows, a_path), _system_name(b_rows, b_path)


def winrate(
    a: str | Path,
    b: str | Path,
    users: str | Path | dict[str, User],
    judge: Judge | str = "exact",
    *,
    system: str | None = None,
    opponent: str | None = None,
    judge_options: dict[str, Any] | None = None,
    workers: int = 1,
    confidence: float = 0.95,
    out: str | Path | None = None,
) -> WinRateResult:
    """Win rate of generations `a` against generations `b` (JSONL files from `fspo generate`).

    `judge` is a `Judge` or a name for `make_judge` (with `judge_options`). Returns one `WinRate`
    for ``all`` and one per split found, the per-pair scores, and the judge's usage (requests,
    cache hits, tokens, cost, order flips) when it keeps one. With `out`, writes it all as JSON.
    """
    users_path = str(users) if not isinstance(users, dict) else "the users given"
    user_map = users if isinstance(users, dict) else users_by_id(users)
    pairs, sys_a, sys_b = pair_generations(a, b, user_map, users_path)
    system, opponent = system or sys_a, opponent or sys_b
    if isinstance(judge, str):
        judge = make_judge(judge, **(judge_options or {}))
    if not isinstance(judge, Judge):
        raise UserError(f"{judge!r} is not a judge (needs .name and .prefer(user, question, a, b))")
    items = [(user_map[p["user_id"]], p["question"], p["a"], p["b"]) for p in pairs]
    scores = prefer_many(judge, items, workers=workers)
    for p, s in zip(pairs, scores, strict=True):
        p["score"] = float(s)
    results = [summarize(scores, system, opponent, judge.name, "all", confidence)]
    for split in sorted({p["split"] for p in pairs if p["split"]}):
        split_scores = [p["score"] for p in pairs if p["split"] == split]
        results.append(summarize(split_scores, system, opponent, judge.name, split, confidence))
    usage = judge.usage.as_dict() if hasattr(judge, "usage") else {}
    notes = judge.notes() if hasattr(judge, "notes") else []
    result = WinRateResult(results, pairs, usage, {"a": str(a), "b": str(b), "users": users_path}, notes)
    if out is not None:
        atomic_write_json(out, result.as_dict())
    return result


def load_winrates(path: str | Path) -> list[WinRate]:
    """The `WinRate`s of a file written by `winrate(..., out=...)` / `fspo eval winrate`."""
    import json

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("kind") != "fspo.winrate":
        raise DataError(f"{path}: not a win-rate file (kind {data.get('kind')!r})")
    return [WinRate.model_validate(r) for r in data["results"]]
