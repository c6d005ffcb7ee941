"""Held-out evaluation during training: the stage's loss and pair metrics on the eval episodes.

The reference is the starting model, scored once before training (`fspo.train.reference`), so
evaluating costs one policy pass over the held-out set. Metrics come from the same
`Objective.loss` that training logs, on the whole set at once, named ``eval/<metric>``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from fspo.infer.pairs import SeqLogps
from fspo.train.contexts import Unit
from fspo.train.objective import BatchLogps, Objective
from fspo.train.refcache import Values
from fspo.train.scoring import looked_up, score_pairs


def eval_batches(units: list[Unit], batch_size: int, bucketed: bool) -> list[list[Unit]]:
    """Evaluation batches: in file order, or sorted by length when batches are length-bucketed."""
    order = list(range(len(units)))
    if bucketed:
        order.sort(key=lambda i: len(units[i].context))
    return [[units[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]


def evaluate(
    objective: Objective,
    model: Any,
    units: list[Unit],
    pad_id: int,
    ref: Values,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> dict[str, float]:
    """`objective.loss` of `model` on the whole held-out set `units` (`ref`: the reference's values),
    as ``eval/`` metrics, plus the number of episodes."""
    cfg = objective.cfg
    was_training = model.training
    model.eval()
    batches = eval_batches(units, cfg.batch_size, cfg.bucketed)
    with torch.no_grad(), autocast():
        scored = [score_pairs(cfg, model, batch, pad_id) for batch in batches]
    model.train(was_training)
    chosen, rejected = (
        SeqLogps(torch.cat([s[i].sum for s in scored]).float(), torch.cat([s[i].count for s in scored]))
        for i in (0, 1)
    )
    in_order = [u for batch in batches for u in batch]
    logps = BatchLogps(chosen, rejected, looked_up(ref, in_order, (chosen, rejected)))
    _, metrics = objective.loss(logps)
    return {**{f"eval/{k}": v.item() for k, v in metrics.items()}, "eval/episodes": float(len(chosen.sum))}
