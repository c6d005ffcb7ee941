"""ELIX ("explain like I'm X"): explain a concept at one of five education levels.

Levels 0-4: elementary school, middle school, high school, college, expert. Answers are written
at a level with that level's vocabulary and sentence length. The level of *any* text is estimated
from the same two surface cues:

    level(text) = 0.6 * mean lexicon level of its level words + 0.4 * length level   (if it has any)
                = length level                                                        (otherwise)
    length level = clip((mean words per sentence - 6) / 4, 0, 4)

and a user with level L has the exact reward  r_u(q, text) = -w * |level(text) - L| + 2 * relevance
(relevance: the concept is named). Training users have whole levels; test users sit halfway between
two levels (0.5, 1.5, 2.5, 3.5): interpolated users never seen in training, as in the paper's
ELIX-hard split.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import Field

from fspo.core.errors import UserError
from fspo.sim.base import RELEVANCE, RELEVANCE_WEIGHT, SEVERAL, Domain, DomainOptions, Persona, Traits
from fspo.sim.text import content_words, keyword_coverage, ramp, sentence_lengths, wordlist, words, wordset

LEVELS = ("elementary school", "middle school", "high school", "college", "expert")

CONCEPTS = wordlist(
    "gravity photosynthesis electricity magnetism volcanoes earthquakes rainbows tides seasons clouds "
    "thunder sound light heat friction evolution vaccines digestion breathing memory money inflation "
    "taxes elections internet computers encryption batteries engines airplanes rockets satellites "
    "glaciers oceans forests dinosaurs fossils atoms molecules cells genes viruses bacteria muscles "
    "bones eyes music language clocks weather"
)
QUESTIONS = ("Can you explain {c}?", "What is the idea behind {c}?", "Please explain {c} to me.")

LEXICON: dict[int, frozenset[str]] = {
    0: wordset("big little fun toy play friends happy see things magic"),
    1: wordset("energy force simple move change scientists observe pattern nature"),
    2: wordset("process system particles reaction structure cycle variables measurable"),
    3: wordset("mechanism equilibrium theory model framework dynamics empirical quantitative"),
    4: wordset("formalism nonlinear stochastic asymptotic tensor perturbative manifold eigenvalue canonical"),
}
_LEVEL_OF = {w: level for level, ws in LEXICON.items() for w in ws}

SENTENCES: dict[int, tuple[str, ...]] = {
    0: (
        "{C} is like a big toy.",
        "You can see {c} every day.",
        "It is fun and a little magic.",
        "Little things make {c} happen.",
        "Think of {c} as happy friends.",
        "Friends can play with {c} too.",
    ),
    1: (
        "{C} is a simple pattern that scientists observe.",
        "Energy and force make {c} move and change.",
        "Scientists observe {c} to find a pattern in nature.",
        "You can see a simple change when {c} happens.",
        "Nature uses {c} to move energy from place to place.",
    ),
    2: (
        "{C} is a process in which particles interact within a larger system of parts.",
        "The structure of {c} depends on a cycle of reactions with measurable variables.",
        "Each reaction in {c} moves the system through a cycle with measurable steps.",
        "We can describe {c} as a system whose structure changes through a steady process.",
    ),
    3: (
        "In current theory, {c} is described by a quantitative model "
        "whose dynamics approach a stable equilibrium.",
        "Empirical work frames {c} as a mechanism within a broader framework linking structure and dynamics.",
        "A quantitative model of {c} treats its mechanism "
        "as a balance of competing dynamics near equilibrium.",
        "The standard framework explains {c} through an empirical theory "
        "of its underlying mechanism and dynamics.",
    ),
    4: (
        "Within the canonical formalism, {c} emerges from nonlinear stochastic couplings "
        "whose asymptotic regime is given by a perturbative expansion around the dominant eigenvalue.",
        "A rigorous treatment of {c} represents its state as a tensor field on a manifold, with nonlinear "
        "stochastic corrections controlled by an asymptotic perturbative bound.",
        "In the perturbative limit, the canonical description of {c} reduces to an eigenvalue problem on a "
        "smooth manifold with stochastic and nonlinear tensor terms.",
    ),
}


def estimate_level(text: str) -> float:
    """The education level (0-4) a text reads at; 0 for text with no words at all."""
    lengths = sentence_lengths(text)
    length_level = 4 * ramp(sum(lengths) / len(lengths), 6, 22) if lengths else 0.0
    hits = [_LEVEL_OF[w] for w in words(text) if w in _LEVEL_OF]
    if not hits:
        return length_level
    return 0.6 * (sum(hits) / len(hits)) + 0.4 * length_level


class ElixOptions(DomainOptions):
    answers_per_question: int = Field(10, ge=2, le=64, description="Spread evenly over the five levels.")
    test_fraction: float = Field(0.2, ge=0, le=1, description="Share of users with a half level (unseen).")


class Elix(Domain):
    name = "elix"
    columns = ("level", RELEVANCE)
    Options = ElixOptions
    options: ElixOptions

    @cached_property
    def _questions(self) -> list[tuple[str, str]]:
        return [(c, q.format(c=c)) for c in CONCEPTS for q in QUESTIONS]

    def questions(self) -> list[str]:
        return [q for _, q in self._questions]

    def keywords(self, question: str) -> list[str]:
        found = [w for w in words(question) if w in _CONCEPT_SET]
        return found or content_words(question)

    def answers(self, question_index: int, rng: random.Random) -> list[str]:
        concept = self._questions[question_index][0]
        pool: list[str] = []
        for i in range(self.options.answers_per_question * 20):
            text = write_explanation(concept, i % len(LEVELS), rng)
            if concept not in words(text):
                continue
            if text not in pool:
                pool.append(text)
            if len(pool) == self.options.answers_per_question:
                break
        return pool

    def writer(self, rng: random.Random) -> Callable[[int], str]:
        level = rng.randrange(len(LEVELS))
        return lambda qi: write_explanation(self._questions[qi][0], level, rng)

    def featurize(self, question: str, text: str) -> list[float]:
        return [estimate_level(text), keyword_coverage(set(words(text)), self.keywords(question), needed=1)]

    def score(self, traits: Traits, feats: np.ndarray) -> np.ndarray:
        spec = traits["level"]
        return (
            -float(spec["weight"]) * np.abs(feats[..., 0] - float(spec["value"]))
            + RELEVANCE_WEIGHT * feats[..., 1]
        )

    def ideal_features(self, traits: Traits, question: str) -> np.ndarray:
        """Written exactly at the user's level (a half level too: `estimate_level` is continuous) and
        naming the concept: reward ``2 * relevance``, the most any text earns."""
        return np.array([float(traits["level"]["value"]), 1.0])

    def carried(self, traits: Traits, feats: np.ndarray) -> list[bool]:
        """The text's level is within half a level of the user's (a half-level user: between theirs)."""
        return [bool(abs(feats[0] - float(traits["level"]["value"])) <= 0.5)]

    def rejected_persona(self, traits: Traits, chosen: np.ndarray, rejected: np.ndarray) -> Traits:
        """The whole level nearest the rejected answer's: answers are written at whole levels."""
        level = float(min(len(LEVELS) - 1, max(0, round(float(rejected[0])))))
        return {"level": {**traits["level"], "value": level}}

    def read_description(self, text: str) -> dict[str, Any]:
        """``{"level": L}`` for "at the X level" (L whole) or "between the X and Y levels" (halfway)."""
        named = set()
        for m in _BETWEEN.finditer(text):
            low, high = _LEVEL_INDEX[m[1].lower()], _LEVEL_INDEX[m[2].lower()]
            named.add((low + high) / 2)
        for m in _AT.finditer(text):
            named.add(float(_LEVEL_INDEX[m[1].lower()]))
        if not named:
            return {}
        return {"level": named.pop() if len(named) == 1 else SEVERAL}

    def sample_persona(self, rng: random.Random, decided: Callable[[Traits], float]) -> Persona:
        level = (
            rng.randrange(len(LEVELS) - 1) + 0.5
            if rng.random() < self.options.test_fraction
            else float(rng.randrange(len(LEVELS)))
        )
        return Persona({"level": {"value": level, "weight": 1.0}})

    def describe(self, traits: Traits) -> str:
        level = float(traits["level"]["value"])
        if level.is_integer():
            return f"This user wants explanations at the {LEVELS[int(level)]} level."
        low, high = LEVELS[int(level)], LEVELS[int(level) + 1]
        return f"This user wants explanations between the {low} and {high} levels."

    def split(self, traits: Traits) -> str:
        return "train" if float(traits["level"]["value"]).is_integer() else "test"

    def check_traits(self, traits: object) -> Traits:
        if not isinstance(traits, dict) or set(traits) != {"level"}:
            raise UserError(
                f"elix user metadata needs traits {{'level': {{'value': 0-4, 'weight': w}}}}, got {traits!r}"
            )
        spec = traits["level"]
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("value"), int | float)
            or "weight" not in spec
        ):
            raise UserError(f"elix trait 'level' must be {{'value': number, 'weight': number}}, got {spec!r}")
        return traits


_CONCEPT_SET = frozenset(CONCEPTS)
_LEVEL_INDEX = {name: i for i, name in enumerate(LEVELS)}
_LEVEL_NAMES = "|".join(re.escape(name) for name in LEVELS)
_AT = re.compile(rf"\bat the ({_LEVEL_NAMES}) level\b", re.IGNORECASE)
_BETWEEN = re.compile(rf"\bbetween the ({_LEVEL_NAMES}) and ({_LEVEL_NAMES}) levels\b", re.IGNORECASE)


def write_explanation(concept: str, level: int, rng: random.Random) -> str:
    """Two or three sentences about `concept` at education level `level` (expert sentences are long
    already, so two)."""
    n = rng.randint(2, 3) if level < 3 else 2
    return " ".join(s.format(c=concept, C=concept.capitalize()) for s in rng.sample(SENTENCES[level], n))
