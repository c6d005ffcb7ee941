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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
) -> list[float]:
    """r(chosen) − r(rejected) for each episode rendered with its first `k` shots.

    With no `score_fn`, both answers are scored against one pass over the prompt (`score_pairs`).
    """
    rendered = [render(e.model_copy(update={"shots": e.shots[:k]}), options, tokenizer) for e in episodes]
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
) -> dict[str, Any]:
    """Accuracy (with Wilson CI) per split and per number of shots; a JSON-ready dict.

    ``{"kind": "fspo.accuracy", "scoring": "implicit_reward" | "log_likelihood", "beta", ...,
    "splits": {split: [{"shots", "accuracy", "ci_low", "ci_high", "n", "correct", "skipped"}]}}``
    """
    if any(k < 0 for k in shots):
        raise ValueError(f"numbers of shots must be >= 0, got {list(shots)}")
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
