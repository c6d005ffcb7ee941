"""What a simulated domain provides, and the registry that finds one by name.

A domain is four things: a fixed set of questions, a pool of candidate answers per question
(written so that answers differ along the dimensions users care about), a feature vector
``phi(question, text)`` computed from the surface of any string, and personas whose exact reward
is a function of those features. The generic machinery in `fspo.sim.simulate` does the rest
(pairing, labelling, refinement bookkeeping), so a new domain is one small module.

Why the reward goes through a feature matrix: scoring a persona on every pooled answer is then one
vectorised product, which keeps 1,500 users x 100 preferences to a second or so, and the judge
(`reward_for`) runs the very same code on a single string, so labels and judge never disagree.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fspo.core.errors import UserError

Traits = dict[str, dict[str, Any]]
"""A persona's preferences: ``{trait: {"value": ..., "weight": float}}``, stored in `User.metadata`."""

RELEVANCE = "relevance"
RELEVANCE_WEIGHT = 2.0
"""Shared by all users: an answer must be about the question, so off-topic text cannot win."""

SEVERAL = "(several)"
"""`Domain.read_description`'s value for a trait a description names more than one value of."""


class DomainOptions(BaseModel):
    """Options every domain accepts; domains extend this model with their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    answers_per_question: int = Field(8, ge=2, le=64, description="Size of each question's answer pool.")
    margin: float = Field(0.25, gt=0, description="A pair is decided (kept) only if |r(a) - r(b)| >= margin.")


@dataclass
class Persona:
    traits: Traits
    refinements: int = 0  # traits added because the persona could not decide enough pairs
    redraws: int = 0  # whole personas thrown away for the same reason


class Domain(ABC):
    """A simulated domain; subclasses set `name`, `columns`, `Options` and the abstract methods."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]  # feature names; RELEVANCE must be one of them
    Options: ClassVar[type[DomainOptions]] = DomainOptions
    # The domain's layer of `fspo quickstart --domain <name>` / `fspo paper` (overrides of
    # fspo/configs/quickstart/default.yaml: its population options, shots...), for a domain that does
    # not ship one as fspo/configs/quickstart/domains/<name>.yaml.
    quickstart_profile: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        try:
            self.options = self.Options(**options)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'option'}: {e['msg']}" for e in err.errors()
            )
            raise UserError(f"bad option for sim domain {self.name!r}: {problems}") from None
        self._col = {c: i for i, c in enumerate(self.columns)}

    # --- content ---------------------------------------------------------------------------
    @abstractmethod
    def questions(self) -> list[str]:
        """Every question of the domain, in a fixed order (independent of the seed)."""

    @abstractmethod
    def answers(self, question_index: int, rng: Any) -> list[str]:
        """A pool of distinct candidate answers for one question, drawn with `rng` (random.Random)."""

    def answer_pairs(self, question_index: int, rng: Any) -> tuple[list[str], list[tuple[int, int]] | None]:
        """One question's answer pool and the pairs users are asked about (None: every pair of it).

        Domains that can write *minimal pairs* (two answers differing in one trait only) return
        those pairs here when asked to; the default asks about every pair of `answers`.
        """
        return self.answers(question_index, rng), None

    def writer(self, rng: Any) -> Callable[[int], str]:
        """A "writer" with one fixed style, drawn with `rng`: answers question `i` in that style.

        Optional: only domains whose answers are written from an explicit style vector have one
        (the pretraining corpus's `styled` documents need it).
        """
        raise UserError(f"sim domain {self.name!r} has no fixed-style writer (needed for styled documents)")

    # --- measurement -------------------------------------------------------------------------
    def _distinct_pool(self, write: Callable[[], str]) -> list[str]:
        """Up to `answers_per_question` distinct texts from `write`, giving up after 20x as many tries."""
        pool: list[str] = []
        for _ in range(self.options.answers_per_question * 20):
            text = write()
            if text not in pool:
                pool.append(text)
            if len(pool) == self.options.answers_per_question:
                break
        return pool

    @abstractmethod
    def featurize(self, question: str, text: str) -> list[float]:
        """`phi(question, text)`, one value per entry of `columns`; must accept any string."""

    def features(self, question: str, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.featurize(question, t) for t in texts], dtype=np.float64).reshape(
            len(texts), len(self.columns)
        )

    def weights(self, traits: Traits) -> np.ndarray:
        """The linear reward's weight vector; domains with a non-linear reward override `score`."""
        w = np.zeros(len(self.columns))
        w[self._col[RELEVANCE]] = RELEVANCE_WEIGHT
        for trait, spec in traits.items():
            w[self._col[f"{trait}={spec['value']}"]] += float(spec["weight"])
        return w

    def score(self, traits: Traits, feats: np.ndarray) -> np.ndarray:
        """Exact rewards of many texts at once (rows of `feats`)."""
        return feats @ self.weights(traits)

    def reward(self, traits: Traits, question: str, text: str) -> float:
        return float(self.score(traits, self.features(question, [text]))[0])

    # Columns whose values do not lie in [0, 1] (a signed score such as sentiment), as (bottom, top).
    column_bounds: ClassVar[dict[str, tuple[float, float]]] = {}

    def ideal_features(self, traits: Traits, question: str) -> np.ndarray:
        """The feature row of an ideal answer to `question` for `traits`: fully relevant and carrying
        every one of the user's trait values. Relevance and each of the user's value columns are at
        their top, the trait's other value columns at their bottom (top and bottom are 1 and 0 unless
        `column_bounds` says otherwise); columns of traits the user lacks are 0 (no weight reads them).
        Every detector's range is the same for every question, so the default does not read it; a
        domain whose features are not per-value columns (a numeric level) overrides this."""
        row = np.zeros(len(self.columns))
        row[self._col[RELEVANCE]] = self.column_bounds.get(RELEVANCE, (0.0, 1.0))[1]
        for trait, spec in traits.items():
            own = f"{trait}={spec['value']}"
            for column, i in self._col.items():
                if column.startswith(f"{trait}="):
                    bottom, top = self.column_bounds.get(column, (0.0, 1.0))
                    row[i] = top if column == own else bottom
        return row

    def ideal_reward(self, traits: Traits, question: str) -> float:
        """The user's exact reward of an ideal answer to `question` (`ideal_features`): with
        non-negative trait weights (every domain draws them so) no text scores higher, so it is the
        ceiling any system's answer can reach for this user and question."""
        return float(self.score(traits, self.ideal_features(traits, question)[None, :])[0])

    def carried(self, traits: Traits, feats: np.ndarray) -> list[bool]:
        """Per trait of the persona, whether a text (its feature row `feats`) carries the persona's
        value of it: its feature for that value is above its feature for every other value of the
        trait (bullets over prose; for a one-column trait, above one half). Domains whose traits
        are not columns (a numeric level) override this."""
        out = []
        for trait, spec in traits.items():
            own = feats[self._col[f"{trait}={spec['value']}"]]
            others = [
                feats[i]
                for c, i in self._col.items()
                if c.startswith(f"{trait}=") and i != self._col[f"{trait}={spec['value']}"]
            ]
            out.append(bool(own > max(others)) if others else bool(own > 0.5))
        return out

    def rejected_persona(self, traits: Traits, chosen: np.ndarray, rejected: np.ndarray) -> Traits:
        """The persona a pair's rejected answer was written for (RAT's rejected target), from the two
        answers' feature rows: the user's persona with each trait the rejected answer carries *less*
        of than the chosen one set to the value it gained most (the first on a tie), weights kept.
        For a minimal pair (one trait flipped) that is the user with that trait flipped; traits the
        two answers share stay the user's, whatever either answer carries of them."""
        out: Traits = {}
        for trait, spec in traits.items():
            own = self._col[f"{trait}={spec['value']}"]
            value = spec["value"]
            if rejected[own] < chosen[own]:
                others = [
                    (rejected[i] - chosen[i], column.partition("=")[2])
                    for column, i in self._col.items()
                    if column.startswith(f"{trait}=") and i != own
                ]
                if others:
                    value = max(others, key=lambda gain: gain[0])[1]  # max keeps the first of equals
            out[trait] = {**spec, "value": value}
        return out

    # Per trait, per value, a regular expression that finds the value named in a description
    # (`describe` writes them; `read_description` reads any text with them).
    description_patterns: ClassVar[dict[str, dict[str, str]]] = {}

    def read_description(self, text: str) -> dict[str, Any]:
        """The trait values a description names: ``{trait: value}`` for each trait named with one
        value, ``{trait: SEVERAL}`` for one named with more than one. Reads a model's inferred
        description as well as `describe`'s sentence (tests check it inverts `describe`)."""
        out: dict[str, Any] = {}
        for trait, patterns in self.description_patterns.items():
            named = [v for v, pattern in patterns.items() if re.search(pattern, text, re.IGNORECASE)]
            if named:
                out[trait] = named[0] if len(named) == 1 else SEVERAL
        return out

    def description_score(self, inferred: str, true: str) -> float:
        """How well `inferred` names the values `true` names, in [-1, 1]: +1 per true value named,
        -1 per trait named with another value (or several) or not in `true` at all, over the number
        of traits `true` names. RAT's description pairs rank sampled descriptions by it."""
        want, got = self.read_description(true), self.read_description(inferred)
        right = sum(got.get(trait) == value for trait, value in want.items())
        wrong = sum(got[trait] != want.get(trait) for trait in got)
        return max(-1.0, (right - wrong) / max(1, len(want)))

    # --- personas ----------------------------------------------------------------------------
    @abstractmethod
    def sample_persona(self, rng: Any, decided: Callable[[Traits], float]) -> Persona:
        """Draw one persona; `decided(traits)` is the fraction of pool pairs it can decide."""

    @abstractmethod
    def describe(self, traits: Traits) -> str:
        """A short, regular sentence naming every active trait (RAT targets, oracle prompts)."""

    @abstractmethod
    def split(self, traits: Traits) -> str | None:
        """``"train"`` or ``"test"`` (test personas hold combinations never seen in training), or None
        when the domain holds out by user instead: the episode sampler's `test_user_fraction` then
        picks the unseen users at random (`fspo.data.episodes.split_users`)."""

    def group(self, traits: Traits) -> str:
        """A coarse user type for disagreement matrices: the persona's heaviest trait."""
        trait, spec = max(traits.items(), key=lambda kv: (kv[1]["weight"], kv[0]))
        return f"{trait}={spec['value']}"

    def check_traits(self, traits: Any) -> Traits:
        """Validate traits read back from a `User` record (a judge may be handed any file)."""
        if not isinstance(traits, dict) or not traits:
            raise UserError(f"{self.name} user metadata needs a non-empty 'traits' object")
        for trait, spec in traits.items():
            if not isinstance(spec, dict) or "value" not in spec or "weight" not in spec:
                raise UserError(f"trait {trait!r}: expected {{'value': ..., 'weight': number}}, got {spec!r}")
            if f"{trait}={spec['value']}" not in self._col and not self._numeric_trait(trait):
                raise UserError(f"unknown {self.name} trait value {trait}={spec['value']!r}")
        return traits

    def _numeric_trait(self, trait: str) -> bool:
        return False


@dataclass
class SimData:
    """A simulated population: its users, their labelled preferences and how it was made."""

    domain: str
    seed: int
    options: dict[str, Any]
    users: list[Any]
    preferences: list[Any]
    info: dict[str, Any] = field(default_factory=dict)
