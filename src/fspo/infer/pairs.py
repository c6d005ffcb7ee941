"""What scoring takes and gives: token ids of preference pairs, and log-probs of target sequences.

A pair is `PairTokens` (prompt, chosen and rejected ids; targets end with eos, but for RAT's
description alone). Several held-out questions of one user that share the same shots form a
`ContextTokens` (the shared prefix and one `QuestionTokens` per question), which `fspo.infer.prefix`
scores as one row. Every scorer returns `SeqLogps` per target sequence, and a pair scorer returns
``(chosen, rejected)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Reduction = Literal["sum", "mean"]


@dataclass(frozen=True)
class PairTokens:
    """One preference pair as token ids. Targets already end with EOS (the plain path's layout), but for
    RAT's description alone, which the answer follows."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


@dataclass(frozen=True)
class QuestionTokens:
    """One held-out question of a context: its own prompt tail and its two answers."""

    question: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


@dataclass(frozen=True)
class ContextTokens:
    """A shared prefix (the user's shots) and K questions scored against it in one row.

    The plain equivalent of item k is ``PairTokens(shared + question_k, chosen_k, rejected_k)``.
    """

    shared: Sequence[int]
    items: Sequence[QuestionTokens]

    @classmethod
    def of(cls, pair: PairTokens) -> ContextTokens:
        return cls(pair.prompt, [QuestionTokens((), pair.chosen, pair.rejected)])

    def pairs(self) -> list[PairTokens]:
        return [PairTokens([*self.shared, *q.question], q.chosen, q.rejected) for q in self.items]

    def __len__(self) -> int:
        return len(self.shared) + sum(len(q.question) + len(q.chosen) + len(q.rejected) for q in self.items)


def as_context(item: PairTokens | ContextTokens) -> ContextTokens:
    """A bare pair is a context of one question with an empty question segment."""
    return ContextTokens.of(item) if isinstance(item, PairTokens) else item


@dataclass(frozen=True)
class SeqLogps:
    """Per-sequence summed target log-probs and scored-token counts; `mean` derives from them.

    The sum is what the paper's IPO uses; `reduce` picks the sum or the per-token mean.
    """

    sum: Tensor  # (batch,)
    count: Tensor  # (batch,) number of scored target tokens (including eos)

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count.clamp(min=1)

    def reduce(self, reduction: Reduction) -> Tensor:
        if reduction == "sum":
            return self.sum
        if reduction == "mean":
            return self.mean
        raise ValueError(f"unknown reduction {reduction!r} (expected 'sum' or 'mean')")
