"""Preference accuracy as a function of the number of shots.

For each held-out query pair, the model ranks the two answers by its implicit reward
r(y) = β (log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, eq. 5): the pair counts as correct
when r(chosen) > r(rejected), half when they are equal. β only scales the reward, so it changes no
ranking; it is kept in the output for the record. Without a reference model the ranking falls back to
plain log-likelihood, log π(chosen|x) vs log π(rejected|x) - a different quantity (it favours short,
likely answers), and the output says so in ``scoring``.

Each episode is re-rendered with only its first k shots, for every k asked, so the curve shows how
much each extra example of the user helps. Episodes with fewer than k shots are left out of that
point (its n says how many were scored). Splits (test_seen / test_unseen) are kept apart: the paper's
question is whether the model generalizes to users it never saw.

Given a `log` path, every scored batch's margins go to an append log (`fspo.core.files.AppendLog`)
as soon as they exist, so a killed run, started again with the same log, scores only what is left.
The batches are planned from the episodes alone (the same length-sorted batches `score_pairs` would
form), never from what is done, so the resumed result is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fspo.core.errors import DataError, UserError
from fspo.core.files import AppendLog, json_lines
from fspo.data.schema import Episode
from fspo.data.template import TemplateOptions, render
from fspo.eval.stats import wilson_interval

ScoreFn = Callable[..., Any]  # (model, tokenizer, prompts, targets, batch_size) -> tensor (n,)


def group_by_split(episodes: Sequence[Episode] | Mapping[str, Sequence[Episode]]) -> dict[str, list[Episode]]:
    if isinstance(episodes, Mapping):
        return {k: list(v) for k, v in episodes.items()}
    groups: dict[str, list[Episode]] = {}
    for e in episodes:
        groups.setdefault(e.split, []).append(e)
    return groups


LOG_KIND = "fspo.accuracy.log"


class MarginLog:
    """The append log of a resumable `accuracy_curve`: a header line with the settings, then one
    line per scored batch, ``{"split", "shots", "episode_ids", "margins"}``.

    Margins are kept under (split, shots, the batch's episode ids), so a batch is reused only when
    exactly the same pairs would be scored together again. Floats survive JSON unchanged (shortest
    repr), which is what makes the resumed result byte-identical. A log written with other settings
    is refused (`UserError`) rather than mixed in.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self._log = AppendLog(self.path)  # cuts a line torn by a kill: that batch is scored again
        self._done: dict[tuple[str, int, tuple[str, ...]], list[float]] = {}
        try:
            if not self._read(settings):
                self._log.append({"kind": LOG_KIND, "settings": settings})
        except BaseException:
            self._log.close()
            raise

    def _read(self, settings: dict[str, Any]) -> bool:
        """Load the logged batches; False when the log is empty (no header yet)."""
        header = False
        for where, row in json_lines(self.path, "pass --overwrite to start over"):
            if not header:
                if not isinstance(row, dict) or row.get("kind") != LOG_KIND:
                    raise UserError(
                        f"{where}: not an accuracy log; "
                        "pass --overwrite to start over, or write to another --out"
                    )
                theirs = row.get("settings") or {}
                changed = {k: (theirs.get(k), v) for k, v in settings.items() if theirs.get(k) != v}
                if changed or theirs.keys() != settings.keys():
                    raise UserError(
                        f"{where}: written with other settings (logged, now: {changed}); "
                        "pass --overwrite to start over, or write to another --out"
                    )
                header = True
                continue
            try:
                key = (row["split"], int(row["shots"]), tuple(row["episode_ids"]))
                margins = [float(m) for m in row["margins"]]
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"{where}: not a batch record ({err!r})") from None
            self._done[key] = margins
        return header

    def get(self, split: str, shots: int, episode_ids: Sequence[str]) -> list[float] | None:
        return self._done.get((split, shots, tuple(episode_ids)))

    def put(self, split: str, shots: int, episode_ids: Sequence[str], margins: list[float]) -> None:
        self._done[(split, shots, tuple(episode_ids))] = margins
        self._log.append(
            {"split": split, "shots": shots, "episode_ids": list(episode_ids), "margins": margins}
        )

    def close(self) -> None:
        self._log.close()


def _pair_batches(tokenizer: Any, rendered: Sequence[Any], batch_size: int) -> list[list[int]]:
    """The batches `score_pairs` forms for these pairs (same sizes, same length sort), so scoring
    them one call each gives the numbers of one call over all of them."""
    from fspo.data.tokens import prompt_token_ids, target_token_ids
    from fspo.infer.logps import length_sorted_batches

    sizes = [
        len(prompt_token_ids(tokenizer, r.prompt))
        + len(target_token_ids(tokenizer, r.chosen))
        + len(target_token_ids(tokenizer, r.rejected))
        for r in rendered
    ]
    return list(length_sorted_batches(sizes, batch_size))


def pair_margins(
    model: Any,
    tokenizer: Any,
    episodes: Sequence[Episode],
    k: int,
    *,
    ref_model: Any = None,
    beta: float = 1.0,
    batch_size: int = 8,
    options: TemplateOptions | None = None,
    score_fn: ScoreFn | None = None,
    log: MarginLog | None = None,
    split: str | None = None,
) -> list[float]:
    """r(chosen) − r(rejected) for each episode rendered with its first `k` shots.

    With no `score_fn`, both answers are scored against one pass over the prompt (`score_pairs`),
    batch by batch; with a `log` (and the episodes' `split`), batches already in it are not scored
    again and new ones are added to it. A custom `score_fn` batches for itself: it gets all pairs in
    one call, logged as one batch.
    """
    rendered = [render(e.model_copy(update={"shots": e.shots[:k]}), options, tokenizer) for e in episodes]
    if score_fn is None:
        plan = _pair_batches(tokenizer, rendered, batch_size)
    else:
        plan = [list(range(len(rendered)))] if rendered else []
    margins: list[float] = [0.0] * len(rendered)
    for idx in plan:
        ids = [episodes[i].episode_id for i in idx]
        got = log.get(split or "", k, ids) if log is not None else None
        if got is None:
            got = _score_batch(
                model, tokenizer, [rendered[i] for i in idx], ref_model, beta, batch_size, score_fn
            )
            if log is not None:
                log.put(split or "", k, ids, got)
        for i, m in zip(idx, got, strict=True):
            margins[i] = m
    return margins


def _score_batch(
    model: Any,
    tokenizer: Any,
    rendered: Sequence[Any],
    ref_model: Any,
    beta: float,
    batch_size: int,
    score_fn: ScoreFn | None,
) -> list[float]:
    if score_fn is None:
        from fspo.infer.logps import score_pairs

        args = ([r.prompt for r in rendered], [r.chosen for r in rendered], [r.rejected for r in rendered])
        chosen, rejected = score_pairs(model, tokenizer, *args, batch_size=batch_size)
        if ref_model is not None:
            ref_c, ref_r = score_pairs(ref_model, tokenizer, *args, batch_size=batch_size)
            chosen, rejected = chosen - ref_c, rejected - ref_r
        return [beta * (float(c) - float(r)) for c, r in zip(chosen, rejected, strict=True)]
    prompts = [r.prompt for r in rendered] * 2
    targets = [r.chosen for r in rendered] + [r.rejected for r in rendered]
    n = len(rendered)
    logps = score_fn(model, tokenizer, prompts, targets, batch_size=batch_size)
    if ref_model is not None:
        logps = logps - score_fn(ref_model, tokenizer, prompts, targets, batch_size=batch_size)
    scores = [float(x) * beta for x in logps]
    return [scores[i] - scores[n + i] for i in range(n)]


def accuracy_curve(
    model: Any,
    tokenizer: Any,
    episodes: Sequence[Episode] | Mapping[str, Sequence[Episode]],
    shots: Sequence[int] = (0, 1, 2, 4, 8),
    *,
    ref_model: Any = None,
    beta: float = 1.0,
    batch_size: int = 8,
    options: TemplateOptions | None = None,
    confidence: float = 0.95,
    score_fn: ScoreFn | None = None,
    model_name: str | None = None,
    ref_name: str | None = None,
    log: str | Path | None = None,
) -> dict[str, Any]:
    """Accuracy (with Wilson CI) per split and per number of shots; a JSON-ready dict.

    `log`: an append log (`MarginLog`) that makes the run resumable; it must have been written with
    the same model and ref names, beta, batch size and template options. The caller deletes it once
    the result is saved.

    ``{"kind": "fspo.accuracy", "scoring": "implicit_reward" | "log_likelihood", "beta", ...,
    "splits": {split: [{"shots", "accuracy", "ci_low", "ci_high", "n", "correct", "skipped"}]}}``
    """
    if any(k < 0 for k in shots):
        raise ValueError(f"numbers of shots must be >= 0, got {list(shots)}")
    settings = {
        "model": model_name,
        "ref": ref_name,
        "scoring": "implicit_reward" if ref_model is not None else "log_likelihood",
        "beta": beta,
        "batch_size": batch_size,
        "options": (options or TemplateOptions()).model_dump(mode="json"),
        "score_fn": None if score_fn is None else getattr(score_fn, "__qualname__", repr(score_fn)),
    }
    margin_log = MarginLog(log, settings) if log is not None else None
    try:
        splits = _curve(
            model,
            tokenizer,
            episodes,
            shots,
            ref_model,
            beta,
            batch_size,
            options,
            confidence,
            score_fn,
            margin_log,
        )
    finally:
        if margin_log is not None:
            margin_log.close()
    with_ref = ref_model is not None
    return {
        "kind": "fspo.accuracy",
        "model": model_name,
        "scoring": "implicit_reward" if with_ref else "log_likelihood",
        "note": (
            "pairs ranked by the implicit reward beta*(log pi - log pi_ref)"
            if with_ref
            else "no reference model: pairs ranked by plain log-likelihood log pi(y|x), "
            "not an implicit reward"
        ),
        "beta": beta,
        "confidence": confidence,
        "splits": splits,
    }


def _curve(
    model: Any,
    tokenizer: Any,
    episodes: Sequence[Episode] | Mapping[str, Sequence[Episode]],
    shots: Sequence[int],
    ref_model: Any,
    beta: float,
    batch_size: int,
    options: TemplateOptions | None,
    confidence: float,
    score_fn: ScoreFn | None,
    log: MarginLog | None,
) -> dict[str, list[dict[str, Any]]]:
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, eps in group_by_split(episodes).items():
        points = []
        for k in sorted(set(shots)):
            usable = [e for e in eps if e.num_shots >= k]
            margins = (
                pair_margins(
                    model,
                    tokenizer,
                    usable,
                    k,
                    ref_model=ref_model,
                    beta=beta,
                    batch_size=batch_size,
                    options=options,
                    score_fn=score_fn,
                    log=log,
                    split=split,
                )
                if usable
                else []
            )
            correct = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
            n = len(margins)
            low, high = wilson_interval(correct, n, confidence)
            points.append(
                {
                    "shots": k,
                    "accuracy": correct / n if n else float("nan"),
                    "ci_low": low,
                    "ci_high": high,
                    "n": n,
                    "correct": correct,
                    "skipped": len(eps) - n,
                }
            )
        splits[split] = points
    return splits
