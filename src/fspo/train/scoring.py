"""Log-probs of a training batch's answers, laid out as the config asks.

Every forward pass of training goes through here: the policy's in each step, the per-step
reference's (`fspo.train.reference`) and held-out evaluation's. The scorers themselves are
`fspo.infer.logps` (one row per answer) and `fspo.infer.prefix` (one row per context).
"""

from __future__ import annotations

from typing import Any

import torch

from fspo.infer import prefix
from fspo.infer.logps import collate_targets, compute_pair_logps, forward_logps
from fspo.infer.pairs import ContextTokens, QuestionTokens, SeqLogps
from fspo.train.config import TrainConfig
from fspo.train.contexts import Unit
from fspo.train.refcache import Values

PairLogps = tuple[SeqLogps, SeqLogps]  # (chosen, rejected)


def score_pairs(cfg: TrainConfig, model: Any, units: list[Unit], pad_id: int) -> PairLogps:
    """Chosen and rejected log-probs of every pair of `units`, in order, in one forward pass.

    ``concat`` is the two-sequence path (prompt+chosen and prompt+rejected as one 2B batch);
    ``prefix`` scores each context as one row (`fspo.infer.prefix`, plain fallback when the model
    cannot take a custom mask).
    """
    if cfg.logps_impl == "concat":
        return compute_pair_logps(model, [p for u in units for p in u.pairs()], pad_id)
    return prefix.pair_logps(model, [u.context for u in units], pad_id)


def chosen_only(ctx: ContextTokens) -> ContextTokens:
    """The context without rejected answers: SFT scores the chosen ones only."""
    return ContextTokens(ctx.shared, [QuestionTokens(q.question, q.chosen, ()) for q in ctx.items])


def score_chosen(
    cfg: TrainConfig, model: Any, units: list[Unit], pad_id: int, spans: dict[str, Any] | None = None
) -> SeqLogps:
    """Chosen-answer log-probs. One question per row: the plain layout; K: shared rows.

    With `spans` (``shot_loss``: episode id -> the shots' preferred-answer positions) each row also
    scores its shots' preferred answers, so the sums and counts cover the query's answer and the
    shots' answers together.
    """
    if cfg.questions_per_context == 1:
        pairs = [p for u in units for p in u.pairs()]
        extra = [spans[i] for u in units for i in u.ids] if spans is not None else None
        return forward_logps(
            model,
            collate_targets([p.prompt for p in pairs], [p.chosen for p in pairs], pad_id, extra),
        )
    chosen, _ = prefix.pair_logps(model, [chosen_only(u.context) for u in units], pad_id)
    return chosen


def looked_up(values: Values, units: list[Unit], policy: PairLogps) -> PairLogps:
    """The reference's summed log-probs of `units` from precomputed `values`; the counts are the
    policy's (both score the same target tokens), on the policy's device."""
    ids = [i for u in units for i in u.ids]
    dev = policy[0].sum.device
    chosen = torch.tensor([values[i][0] for i in ids], dtype=torch.float32, device=dev)
    rejected = torch.tensor([values[i][1] for i in ids], dtype=torch.float32, device=dev)
    return SeqLogps(chosen, policy[0].count), SeqLogps(rejected, policy[1].count)
