"""Roleplay: open-ended advice questions, answered in many styles, judged by personas with 10 traits.

The paper's main domain (1,500 personas). Here every persona cares about 2-4 *surface* traits of an
answer, each detectable on any string, so a model's generated answer has a well-defined reward:

    r_u(q, text) = sum_k w_k * phi_{k, v_k}(text) + 2 * relevance(q, text)

with ``phi`` the feature of the persona's chosen value ``v_k`` of trait ``k`` (see `FEATURES` for the
exact detectors) and ``relevance`` the share of the question's keywords the text names (2 of the
topic word and its two objects are enough). Answers are written from a *viewpoint* (practical,
scientific, emotional, historical: the paper's view-conditioning) with a random style vector, so
any two answers to one question differ along several user-relevant dimensions.

Iterative persona refinement (the paper's coherence step): a persona that decides fewer than
`min_decided` of the pool's pairs by at least the margin gets another active trait, up to
`max_traits`; if even that fails it is redrawn. Both counts are reported.

Held-out conjunctions (`HELD_OUT`): a persona holding any of these two trait values together is a
*test* user; no training user ever has one, so test users are genuinely new combinations.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

from pydantic import Field, model_validator

from fspo.sim import roleplay_words as W
from fspo.sim.base import RELEVANCE, Domain, DomainOptions, Persona, Traits
from fspo.sim.text import (
    bullet_lines,
    capped,
    content_words,
    count_words,
    ends_with_question,
    keyword_coverage,
    phrase_pattern,
    ramp,
    words,
)

TRAITS: dict[str, tuple[str, ...]] = {
    "length": ("short", "long"),
    "format": ("bullets", "prose"),
    "tone": ("casual", "formal"),
    "viewpoint": W.VIEWPOINTS,
    "examples": ("yes", "no"),
    "enthusiasm": ("yes", "no"),
    "followup": ("yes", "no"),
    "first_person": ("yes", "no"),
    "humor": ("yes", "no"),
    "caveat": ("yes", "no"),
}

# Held-out conjunctions: a persona with both values of any pair is a test user.
HELD_OUT: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("length", "short"), ("viewpoint", "historical")),
    (("length", "long"), ("humor", "no")),
    (("format", "bullets"), ("tone", "formal")),
    (("format", "prose"), ("caveat", "yes")),
    (("tone", "casual"), ("first_person", "no")),
    (("examples", "yes"), ("followup", "yes")),
    (("examples", "no"), ("viewpoint", "scientific")),
    (("enthusiasm", "yes"), ("caveat", "no")),
    (("enthusiasm", "no"), ("humor", "yes")),
    (("first_person", "yes"), ("viewpoint", "emotional")),
    (("humor", "yes"), ("followup", "no")),
    (("viewpoint", "practical"), ("length", "long")),
)

# Noun phrases for descriptions; `length` and `format` shape the head, the rest follow "with".
_PHRASES: dict[str, dict[str, str]] = {
    "length": {"short": "short", "long": "long"},
    "format": {"bullets": "in bullet points", "prose": "in plain prose"},
    "tone": {"casual": "a casual tone", "formal": "a formal tone"},
    "viewpoint": {
        "practical": "practical advice",
        "scientific": "scientific facts",
        "emotional": "emotional support",
        "historical": "historical background",
    },
    "examples": {"yes": "an example", "no": "no examples"},
    "enthusiasm": {"yes": "lots of enthusiasm", "no": "a calm voice"},
    "followup": {"yes": "a question at the end", "no": "no question at the end"},
    "first_person": {"yes": "personal opinions", "no": "an impersonal voice"},
    "humor": {"yes": "a bit of humor", "no": "no jokes"},
    "caveat": {"yes": "a safety warning", "no": "no warnings"},
}

# `describe` puts length before "answers" ("short answers in bullet points"); every other phrase
# is matched as written, whole words only.
_PATTERNS: dict[str, dict[str, str]] = {
    trait: {
        value: (rf"\b{phrase} answers\b" if trait == "length" else rf"\b{re.escape(phrase)}\b")
        for value, phrase in phrases.items()
    }
    for trait, phrases in _PHRASES.items()
}

_COLUMNS = tuple(f"{t}={v}" for t, values in TRAITS.items() for v in values) + (RELEVANCE,)
_FIRST_PERSON = phrase_pattern(W.FIRST_PERSON_MARKERS)
_EXAMPLE = phrase_pattern(W.EXAMPLE_MARKERS)
_CAVEAT = phrase_pattern(W.CAVEAT_MARKERS)

SHORT_WORDS, LONG_WORDS = 12, 36  # the length feature ramps from 0 (<= 12 words) to 1 (>= 36 words)


class RoleplayOptions(DomainOptions):
    min_decided: float = Field(0.8, gt=0, le=1, description="Refine personas deciding fewer pool pairs.")
    min_traits: int = Field(2, ge=1, le=len(TRAITS))
    max_traits: int = Field(4, ge=1, le=len(TRAITS))
    weight_range: tuple[float, float] = (0.5, 1.5)
    topics: int = Field(len(W.TOPICS), ge=1, le=len(W.TOPICS), description="Use the first N topics.")
    traits: tuple[str, ...] = Field(
        tuple(TRAITS), min_length=1, description="The traits personas may care about (a subset of TRAITS)."
    )
    pairing: Literal["pool", "minimal"] = Field(
        "pool",
        description="'pool': users compare any two answers of a question's pool; 'minimal': an answer and "
        "a copy with one trait changed, `answers_per_question` such bases (see `minimal_pair_pool`).",
    )

    holdout: Literal["combinations", "users"] = Field(
        "combinations",
        description="Who the unseen test users are. 'combinations': personas holding a `HELD_OUT` pair of "
        "trait values (never seen together in training); 'users': no mark, so the episode sampler holds "
        "out a random share of users (`test_user_fraction`), for populations too small to hold out "
        "combinations (e.g. one trait per user).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> RoleplayOptions:
        if self.min_traits > self.max_traits:
            raise ValueError(f"min_traits ({self.min_traits}) exceeds max_traits ({self.max_traits})")
        unknown = [t for t in self.traits if t not in TRAITS]
        if unknown:
            raise ValueError(f"unknown traits {unknown}; choose from {', '.join(TRAITS)}")
        if self.max_traits > len(set(self.traits)):
            allowed = len(set(self.traits))
            raise ValueError(f"max_traits ({self.max_traits}) exceeds the {allowed} traits allowed")
        low, high = self.weight_range
        if not 0 < low <= high:
            raise ValueError(f"weight_range must be 0 < low <= high, got {self.weight_range}")
        return self


class Roleplay(Domain):
    name = "roleplay"
    columns = _COLUMNS
    column_bounds = {"tone=casual": (-1.0, 1.0), "tone=formal": (-1.0, 1.0)}
    description_patterns = _PATTERNS
    Options = RoleplayOptions
    options: RoleplayOptions

    @cached_property
    def _topics(self) -> list[str]:
        return list(W.TOPICS)[: self.options.topics]

    def questions(self) -> list[str]:
        return [q.format(topic=t) for t in self._topics for q in W.QUESTION_TEMPLATES]

    def topic_of(self, question: str) -> str | None:
        for w in words(question):
            if w in W.TOPICS:
                return w
        return None

    def keywords(self, question: str) -> list[str]:
        topic = self.topic_of(question)
        return [topic, *W.TOPICS[topic]] if topic else content_words(question)

    # --- writing answers -------------------------------------------------------------------
    def answers(self, question_index: int, rng: random.Random) -> list[str]:
        topic = self._topic(question_index)
        return self._distinct_pool(lambda: write_answer(topic, rng))

    def answer_pairs(
        self, question_index: int, rng: random.Random
    ) -> tuple[list[str], list[tuple[int, int]] | None]:
        if self.options.pairing == "pool":
            return super().answer_pairs(question_index, rng)
        o = self.options
        return minimal_pair_pool(self._topic(question_index), o.answers_per_question, o.traits, rng)

    def writer(self, rng: random.Random) -> Callable[[int], str]:
        style = draw_style(rng)
        return lambda qi: write_answer(self._topic(qi), rng, style)

    def _topic(self, question_index: int) -> str:
        """The topic of question `question_index` (`questions` lists each topic's templates in a row)."""
        return self._topics[question_index // len(W.QUESTION_TEMPLATES)]

    # --- measuring them --------------------------------------------------------------------
    def featurize(self, question: str, text: str) -> list[float]:
        toks = words(text)
        counts = Counter(toks)
        norm = " ".join(toks)
        long = ramp(len(toks), SHORT_WORDS, LONG_WORDS)
        bullets = capped(bullet_lines(text), 2)
        tone = capped(count_words(counts, W.CASUAL_MARKERS), 1) - capped(
            count_words(counts, W.FORMAL_MARKERS), 1
        )
        example = capped(len(_EXAMPLE.findall(norm)), 1)
        excited = capped(text.count("!"), 2)
        views = [capped(count_words(counts, W.VIEW_MARKERS[v]), 2) for v in W.VIEWPOINTS]
        follow = float(ends_with_question(text))
        first = capped(len(_FIRST_PERSON.findall(norm)), 1)
        humor = capped(count_words(counts, W.HUMOR_MARKERS), 2)
        caveat = capped(len(_CAVEAT.findall(norm)), 1)
        relevance = keyword_coverage(set(toks), self.keywords(question), needed=2)
        return [
            1 - long, long,
            bullets, 1 - bullets,
            tone, -tone,
            *views,
            example, 1 - example,
            excited, 1 - excited,
            follow, 1 - follow,
            first, 1 - first,
            humor, 1 - humor,
            caveat, 1 - caveat,
            relevance,
        ]  # fmt: skip

    # --- personas --------------------------------------------------------------------------
    def sample_persona(self, rng: random.Random, decided: Callable[[Traits], float]) -> Persona:
        o = self.options
        redraws = 0
        while True:
            traits: Traits = {}
            for _ in range(rng.randint(o.min_traits, min(o.max_traits, o.min_traits + 1))):
                self._add_trait(traits, rng)
            refinements = 0
            share = decided(traits)
            while share < o.min_decided and len(traits) < o.max_traits:
                self._add_trait(traits, rng)  # refinement: one more trait to decide more pairs
                refinements += 1
                share = decided(traits)
            if share >= o.min_decided or redraws >= 50:
                return Persona(traits, refinements, redraws)
            redraws += 1

    def _add_trait(self, traits: Traits, rng: random.Random) -> None:
        trait = rng.choice([t for t in TRAITS if t in self.options.traits and t not in traits])
        low, high = self.options.weight_range
        traits[trait] = {"value": rng.choice(TRAITS[trait]), "weight": round(rng.uniform(low, high), 2)}

    def describe(self, traits: Traits) -> str:
        return describe(traits)

    def split(self, traits: Traits) -> str | None:
        if self.options.holdout == "users":
            return None
        return "test" if held_out_pairs(traits) else "train"


def held_out_pairs(traits: Traits) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The held-out conjunctions a persona holds (non-empty means it is a test user)."""
    has = {(t, spec["value"]) for t, spec in traits.items()}
    return [pair for pair in HELD_OUT if pair[0] in has and pair[1] in has]


def describe(traits: Traits) -> str:
    """E.g. "This user prefers short answers in bullet points, with a casual tone and practical advice."."""
    head = "answers"
    if "length" in traits:
        head = f"{_PHRASES['length'][traits['length']['value']]} answers"
    if "format" in traits:
        head += " " + _PHRASES["format"][traits["format"]["value"]]
    extras = [
        _PHRASES[t][traits[t]["value"]] for t in TRAITS if t in traits and t not in ("length", "format")
    ]
    if not extras:
        return f"This user prefers {head}."
    listed = extras[0] if len(extras) == 1 else ", ".join(extras[:-1]) + " and " + extras[-1]
    comma = "," if head != "answers" else ""
    return f"This user prefers {head}{comma} with {listed}."


def phrase_for(trait: str, value: str) -> str:
    """The words a description uses for one trait value (tests check every active one is there)."""
    return _PHRASES[trait][value]


@dataclass(frozen=True)
class AnswerStyle:
    """Every style choice `write_answer` makes, fixed: one "writer" answering many questions alike."""

    viewpoint: str
    long: bool
    first_person: bool
    tone: str  # casual, formal or neutral
    extras: frozenset[str]  # of `_EXTRAS`; at most 1 for short answers, 1-2 for long ones
    enthusiasm: bool
    bullets: bool


def draw_style(rng: random.Random) -> AnswerStyle:
    """A random `AnswerStyle`, with the same distribution as the per-answer choices of `write_answer`."""
    long = rng.random() < 0.5
    return AnswerStyle(
        viewpoint=rng.choice(W.VIEWPOINTS),
        long=long,
        first_person=rng.random() < 0.5,
        tone=rng.choice(("casual", "formal", "neutral")),
        extras=frozenset(rng.sample(_EXTRAS, rng.randint(1, 2) if long else rng.randint(0, 1))),
        enthusiasm=rng.random() < 0.5,
        bullets=rng.random() < 0.5,
    )


def write_answer(topic: str, rng: random.Random, style: AnswerStyle | None = None) -> str:
    """One answer from a random viewpoint and style vector (or from `style`, fixed); see `roleplay_words`.

    Only the wording (sentences, openers, extras' phrasings) is drawn when `style` is given. Without
    it every choice is drawn too, in one fixed order that a seed's simulations depend on.
    """
    fill = _filler(topic)
    viewpoint = style.viewpoint if style else rng.choice(W.VIEWPOINTS)
    long = style.long if style else rng.random() < 0.5
    content = [fill(s) for s in rng.sample(W.CONTENT[viewpoint], 2 if long else 1)]
    first_person = style.first_person if style else rng.random() < 0.5
    tone = style.tone if style else rng.choice(("casual", "formal", "neutral"))
    opener = ""
    if tone != "neutral":
        opener = rng.choice(W.CASUAL_OPENERS if tone == "casual" else W.FORMAL_OPENERS)
    # Extras are capped (short: 0-1, long: 1-2) so answers stay within ~10-45 words.
    if style:
        extras = set(style.extras)
    else:
        extras = set(rng.sample(_EXTRAS, rng.randint(1, 2) if long else rng.randint(0, 1)))
    phrases = {e: fill(rng.choice(_PHRASE_POOLS[e])) for e in _SENTENCE_EXTRAS if e in extras}
    enthusiasm = style.enthusiasm if style else rng.random() < 0.5
    if "followup" in extras:  # drawn after enthusiasm: the fixed order seeded simulations depend on
        phrases["followup"] = fill(rng.choice(W.FOLLOW_UPS))
    bullets = style.bullets if style else rng.random() < 0.5
    return _render(content, first_person, opener, phrases, enthusiasm, bullets)


def _filler(topic: str) -> Callable[[str], str]:
    a, b = W.TOPICS[topic]
    return lambda template: template.format(t=topic, T=topic.capitalize(), a=a, b=b)


def _render(
    content: list[str],
    first_person: bool,
    opener: str,
    phrases: dict[str, str],
    enthusiasm: bool,
    bullets: bool,
) -> str:
    """The text of an answer whose every choice is made: `phrases` holds the extras it carries."""
    content = list(content)
    if first_person:
        content[0] = "In my experience, " + content[0][0].lower() + content[0][1:]
    if opener:  # tone: one marker word in front, so tone costs no length
        content[0] = opener + content[0][0].lower() + content[0][1:]
    sentences = content + [phrases[e] for e in _SENTENCE_EXTRAS if e in phrases]
    if enthusiasm:  # statements end with '!'
        sentences = [s[:-1] + "!" if s.endswith(".") else s for s in sentences]
    follow_up = [phrases["followup"]] if "followup" in phrases else []
    if bullets:  # a follow-up question on its own last line
        return "\n".join([f"- {s}" for s in sentences] + follow_up)
    return " ".join(sentences + follow_up)


@dataclass(frozen=True)
class Wording:
    """Every wording choice for one answer and all its one-trait variants (see `minimal_pair_pool`)."""

    content: dict[str, list[str]]  # viewpoint -> two sentences; short answers use the first
    openers: dict[str, str]  # tone -> opener ("" for neutral)
    phrases: dict[str, str]  # extra -> its sentence

    @classmethod
    def draw(cls, topic: str, rng: random.Random) -> Wording:
        fill = _filler(topic)
        return cls(
            content={v: [fill(s) for s in rng.sample(W.CONTENT[v], 2)] for v in W.VIEWPOINTS},
            openers={
                "casual": rng.choice(W.CASUAL_OPENERS),
                "formal": rng.choice(W.FORMAL_OPENERS),
                "neutral": "",
            },
            phrases={extra: fill(rng.choice(_PHRASE_POOLS[extra])) for extra in _EXTRAS},
        )

    def render(self, style: AnswerStyle) -> str:
        return _render(
            self.content[style.viewpoint][: 2 if style.long else 1],
            style.first_person,
            self.openers[style.tone],
            {e: p for e, p in self.phrases.items() if e in style.extras},
            style.enthusiasm,
            style.bullets,
        )


def flip(style: AnswerStyle, trait: str, rng: random.Random) -> AnswerStyle:
    """`style` with the one choice that trait `trait` reads changed (to another value, for tone/viewpoint)."""
    if trait == "length":
        return replace(style, long=not style.long)
    if trait == "format":
        return replace(style, bullets=not style.bullets)
    if trait in ("enthusiasm", "first_person"):
        return replace(style, **{trait: not getattr(style, trait)})
    if trait == "tone":
        others = {"casual": ("formal",), "formal": ("casual",), "neutral": ("casual", "formal")}[style.tone]
        return replace(style, tone=rng.choice(others))
    if trait == "viewpoint":
        return replace(style, viewpoint=rng.choice([v for v in W.VIEWPOINTS if v != style.viewpoint]))
    extra = _EXTRA_OF_TRAIT[trait]
    return replace(style, extras=style.extras ^ {extra})


def minimal_pair_pool(
    topic: str, bases: int, traits: tuple[str, ...], rng: random.Random
) -> tuple[list[str], list[tuple[int, int]]]:
    """`bases` random answers, each followed by one variant per trait in `traits` that differs from
    it in that trait's choice only (same sentences otherwise), and the (base, variant) pairs.

    Why: in a pool of independent answers two answers differ in ~5 traits at once, so a user's
    choice tells little about any one of its traits. A minimal pair is decided by the one trait it
    flips, so every preference of a user names one of its trait values outright.
    """
    pool: list[str] = []
    pairs: list[tuple[int, int]] = []
    for _ in range(bases):
        style, wording = draw_style(rng), Wording.draw(topic, rng)
        base = len(pool)
        pool.append(wording.render(style))
        for trait in traits:
            pool.append(wording.render(flip(style, trait, rng)))
            pairs.append((base, len(pool) - 1))
    return pool, pairs


_SENTENCE_EXTRAS = ("example", "humor", "caveat")  # in this order before a follow-up question
_EXTRAS = (*_SENTENCE_EXTRAS, "followup")
_PHRASE_POOLS = {"example": W.EXAMPLES, "humor": W.HUMOR, "caveat": W.CAVEATS, "followup": W.FOLLOW_UPS}
_EXTRA_OF_TRAIT = {"examples": "example", "humor": "humor", "caveat": "caveat", "followup": "followup"}
