"""Preference and SFT losses as pure functions of log-probabilities (testable without a model).

Every function takes per-sequence log-probabilities of the *target* tokens, already reduced over the
sequence by `fspo.infer.logps` (``sum`` as in the paper and the DPO/FSPO reference code, or ``mean``
as TRL/LLaMA-Factory do). The reduction is therefore a property of the log-prob computation, not of
the loss: with ``sum`` the IPO target margin ``1/(2β)`` is measured in nats over the whole answer
(β=0.01 → 50 nats), with ``mean`` in nats per token; pick β accordingly.

Notation (Rafailov et al. 2023): ``π_c = log π_θ(y_c|x)``, ``ref_c = log π_ref(y_c|x)``, and the same
for the rejected answer ``y_r``. The implicit reward of an answer is ``r = β (log π_θ − log π_ref)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

LossType = Literal["dpo", "ipo"]


@dataclass(frozen=True)
class PreferenceLoss:
    """The batch loss plus the per-example diagnostics the trainer and evaluation log.

    Rewards are detached: they are for logging and accuracy, never part of the graph.
    """

    loss: Tensor  # scalar: mean of `losses`
    losses: Tensor  # (batch,)
    chosen_rewards: Tensor  # (batch,) β(log π_θ(y_c|x) − log π_ref(y_c|x))
    rejected_rewards: Tensor  # (batch,)

    @classmethod
    def of(
        cls,
        losses: Tensor,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        ref_chosen: Tensor,
        ref_rejected: Tensor,
        beta: float,
    ) -> PreferenceLoss:
        """Per-example `losses` with their mean and the answers' implicit rewards (detached)."""
        return cls(
            losses.mean(),
            losses,
            (beta * (policy_chosen - ref_chosen)).detach(),
            (beta * (policy_rejected - ref_rejected)).detach(),
        )

    @property
    def margins(self) -> Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> Tensor:
        """Fraction of pairs whose implicit reward ranks the chosen answer first (ties count as wrong)."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def _log_ratio_difference(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """h = (π_c − ref_c) − (π_r − ref_r): how much more the policy moved towards the chosen answer."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def preference_loss(
    loss_type: LossType,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """The DPO or IPO loss of a batch, from summed (or mean) target log-probs; h is the difference of
    log-ratios (`_log_ratio_difference`).

    * ``dpo``: Rafailov et al. 2023, eq. 7, ``L = −log σ(β h)``. `label_smoothing` ε gives the
      conservative DPO of Mitchell (2023), ``−(1−ε) log σ(β h) − ε log σ(−β h)``; ε=0 is plain DPO.
    * ``ipo``: Azar et al. 2023, eq. 17, ``L = (h − 1/(2β))²``. Unlike DPO the loss is minimised at
      a finite margin ``h = 1/(2β)`` (in nats of the chosen reduction, see the module docstring),
      which regularises towards the reference even when the preferences are deterministic. The FSPO
      paper and code use it with summed log-probs, β=0.01. `label_smoothing` does not apply.
    """
    h = _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if loss_type == "dpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss type {loss_type!r} (expected 'dpo' or 'ipo')")
    return PreferenceLoss.of(losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def sft_loss(target_logps_sum: Tensor, target_token_counts: Tensor) -> Tensor:
    """Negative log-likelihood per target token over the whole batch (few-shot Pref-FT / SFT).

    Tokens are pooled across the batch (Σ log p / Σ tokens), the usual causal-LM convention, so a
    long answer weighs more than a short one, exactly as one long concatenated document would.
    """
    return -target_logps_sum.sum() / target_token_counts.sum().clamp(min=1)


def implicit_reward_accuracy(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """Fraction of pairs where β(log π − log π_ref) ranks chosen first (β>0 does not change it)."""
    h = _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h > 0).float().mean()


__all__ = [
    "LossType",
    "PreferenceLoss",
    "implicit_reward_accuracy",
    "preference_loss",
    "sft_loss",
]
