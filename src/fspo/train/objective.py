"""What each training stage minimises, chosen once per run (`objective_for`).

* ``sft`` – few-shot preference fine-tuning (Pref-FT): NLL per token of the chosen answer given the
  episode prompt (`fspo.train.losses.sft_loss`). With zero shots it is plain SFT (the population
  baseline).
* ``fspo`` – DPO or IPO against a frozen reference (`fspo.train.losses.preference_loss`), plus
  ``nll_weight`` times that NLL (RPO). With zero shots it is the population IPO/DPO baseline.

The stages differ only here: which log-probs a training batch needs (SFT: the chosen answers; FSPO:
both answers and the reference's), the loss made of them, whether a reference is set up, and so
what a context row holds (an SFT row carries no rejected answers). Data, batches, the loop and
evaluation are the same code for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from fspo.infer.pairs import SeqLogps
from fspo.train.config import TrainConfig
from fspo.train.contexts import Unit, row_stats
from fspo.train.losses import PreferenceLoss, preference_loss, sft_loss
from fspo.train.reference import CachedReference, StepReference
from fspo.train.scoring import PairLogps, chosen_only, score_chosen, score_pairs

RowStats = tuple[int, int, int]  # `row_stats`: (rows, real tokens, longest row)


@dataclass(frozen=True)
class BatchLogps:
    """The policy's summed log-probs of one batch's chosen answers and, where the objective or the
    evaluation scores them, of its rejected answers and the reference's of both."""

    chosen: SeqLogps
    rejected: SeqLogps | None = None
    reference: PairLogps | None = None


def preference_of(cfg: TrainConfig, policy: PairLogps, ref: PairLogps) -> PreferenceLoss:
    """The configured preference loss (`loss`, `beta`, `reduction`, `label_smoothing`) of a batch."""
    r = cfg.reduction
    return preference_loss(
        cfg.loss,
        policy[0].reduce(r),
        policy[1].reduce(r),
        ref[0].reduce(r),
        ref[1].reduce(r),
        cfg.beta,
        cfg.label_smoothing,
    )


class Objective(ABC):
    """One stage's loss, the log-probs a training batch needs for it, and the rows they take."""

    needs_reference: ClassVar[bool]

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @abstractmethod
    def row_stats(self, unit: Unit, shared: bool) -> RowStats:
        """What the scorer builds for `unit` in training (`row_stats`), `shared` when it really
        builds shared rows (prefix scorer, and a model that takes them)."""

    @abstractmethod
    def train_logps(
        self, model: Any, units: list[Unit], pad_id: int, reference: CachedReference | StepReference | None
    ) -> BatchLogps:
        """The log-probs one training micro-batch needs (`reference`: the run's, None without one)."""

    @abstractmethod
    def pair_loss(self, preference: PreferenceLoss, nll: Tensor) -> Tensor:
        """The loss of a batch whose both answers and reference are scored (FSPO training, evaluation)."""

    @abstractmethod
    def describe(self) -> str:
        """The stage and its loss, as the model card states them."""

    def loss(self, logps: BatchLogps) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch of log-probs and what is logged about it.

        Given only the chosen answers (SFT training) that is their NLL per token. Given the rejected
        answers' and the reference's log-probs too (FSPO training; evaluation of either stage) it is
        `pair_loss`, and the metrics also say how the policy ranks each pair: implicit-reward
        accuracy, margin and rewards, and plain log-prob accuracy.
        """
        chosen, rejected, ref = logps.chosen, logps.rejected, logps.reference
        nll = sft_loss(chosen.sum, chosen.count)
        if rejected is None or ref is None:
            return nll, {"loss": nll.detach()}
        pl = preference_of(self.cfg, (chosen, rejected), ref)
        loss = self.pair_loss(pl, nll)
        r = self.cfg.reduction
        return loss, {
            "loss": loss.detach(),
            "reward_accuracy": pl.accuracy,
            "margin": pl.margins.mean(),
            "chosen_reward": pl.chosen_rewards.mean(),
            "rejected_reward": pl.rejected_rewards.mean(),
            "chosen_nll": nll.detach(),
            "logp_accuracy": (chosen.reduce(r) > rejected.reduce(r)).float().mean(),
        }


class SFT(Objective):
    """Few-shot preference fine-tuning: the chosen answers' NLL; with ``shot_loss`` the shots'
    preferred answers (`shot_spans`: episode id -> their positions) are targets too."""

    needs_reference = False

    def __init__(self, cfg: TrainConfig, shot_spans: dict[str, Any] | None = None):
        super().__init__(cfg)
        self.shot_spans = shot_spans if cfg.shot_loss else None

    def row_stats(self, unit: Unit, shared: bool) -> RowStats:
        # K questions per context are always scored in shared rows (`score_chosen`).
        return row_stats(chosen_only(unit.context), shared or self.cfg.questions_per_context > 1)

    def train_logps(
        self, model: Any, units: list[Unit], pad_id: int, reference: CachedReference | StepReference | None
    ) -> BatchLogps:
        return BatchLogps(score_chosen(self.cfg, model, units, pad_id, self.shot_spans))

    def pair_loss(self, preference: PreferenceLoss, nll: Tensor) -> Tensor:
        return nll

    def describe(self) -> str:
        return "`sft`"


class FSPO(Objective):
    """The preference loss against the reference, plus ``nll_weight`` times the chosen answers' NLL."""

    needs_reference = True

    def row_stats(self, unit: Unit, shared: bool) -> RowStats:
        return row_stats(unit.context, shared)

    def train_logps(
        self, model: Any, units: list[Unit], pad_id: int, reference: CachedReference | StepReference | None
    ) -> BatchLogps:
        if reference is None:
            raise ValueError("the fspo objective needs the run's reference")
        policy, ref = reference.score(units, lambda: score_pairs(self.cfg, model, units, pad_id))
        return BatchLogps(policy[0], policy[1], ref)

    def pair_loss(self, preference: PreferenceLoss, nll: Tensor) -> Tensor:
        if self.cfg.nll_weight:
            return preference.loss + self.cfg.nll_weight * nll
        return preference.loss

    def describe(self) -> str:
        cfg = self.cfg
        return f"`fspo`, loss `{cfg.loss}` (beta {cfg.beta}, {cfg.reduction} log-probs)"


def objective_for(cfg: TrainConfig, shot_spans: dict[str, Any] | None = None) -> Objective:
    """The objective of `cfg.stage` (`shot_spans`: SFT's ``shot_loss`` targets, see `SFT`)."""
    if cfg.stage == "sft":
        return SFT(cfg, shot_spans)
    return FSPO(cfg)
