"""Reviews: write a review of a (generated) movie; users differ in sentiment, length and focus.

The paper's Reviews domain has 8 user types: positive, negative, concise, verbose (trained) and
their 4 combinations (interpolated, unseen in training). We keep those and add one dimension,
*focus* (acting or plot). Training personas hold exactly one trait (6 types); test personas hold one
of the paper's 4 combinations, so test users are interpolations never seen in training. Weights are
jittered per user (0.8-1.2), so users of one type are alike but not identical.

    r_u(q, text) = sum_k w_k * phi_{k, v_k}(text) + 2 * relevance(q, text)

sentiment = clip((#positive - #negative lexicon words) / 2, -1, 1); length ramps from 0 at 15
words to 1 at 45; focus = min(#focus words, 2) / 2; relevance = share of {title words, genre}
named (2 are enough).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from functools import cached_property
from typing import Literal

from pydantic import Field

from fspo.sim.base import RELEVANCE, Domain, DomainOptions, Persona, Traits
from fspo.sim.text import capped, content_words, count_words, keyword_coverage, ramp, wordlist, words, wordset

ADJECTIVES = wordlist(
    "Silent Golden Broken Hidden Lost Last Crimson Frozen Wild Dark "
    "Distant Secret Burning Quiet Endless Iron Glass Midnight Lonely Electric"
)
NOUNS = wordlist(
    "River Garden Empire Letter Mountain Station Mirror Harbor Forest Island "
    "Promise Machine Crown Shadow Bridge Engine Voyage Storm Castle Signal"
)
GENRES = ("comedy", "drama", "horror", "thriller", "romance", "western", "musical", "mystery")
QUESTION = "Write a review of the {genre} movie The {adj} {noun}."

POSITIVE = wordset("wonderful brilliant moving clever perfect great beautiful delightful loved superb")
NEGATIVE = wordset("wooden dull bored weak boring awful predictable mess hated bland")
ACTING = wordset("cast actor actress acting performance performances")
PLOT = wordset("plot story ending twist script pacing")

SENTENCES: dict[tuple[str, str], tuple[str, ...]] = {
    ("positive", "acting"): (
        "The cast of {title} gives a wonderful performance.",
        "The lead actor in {title} is brilliant and moving.",
        "Every actress in this {genre} is superb.",
    ),
    ("positive", "plot"): (
        "The story of {title} is clever and the ending is perfect.",
        "The plot of this {genre} is great from start to finish.",
        "The script of {title} is beautiful and delightful.",
    ),
    ("negative", "acting"): (
        "The acting in {title} is wooden and dull.",
        "The cast of this {genre} seems bored and weak.",
        "Every performance in {title} is bland.",
    ),
    ("negative", "plot"): (
        "The plot of {title} is boring and the ending is awful.",
        "The story of this {genre} is a predictable mess.",
        "The script of {title} is weak and the pacing is dull.",
    ),
}
FILLER = (
    "{title} is a {genre} movie from a new director.",
    "It runs for about two hours.",
    "The music and the sets fit the {genre} mood.",
    "It opened in a few cities last spring.",
    "The camera work stays close to the faces.",
)
CLOSING = {"positive": "Overall, I loved {title}.", "negative": "Overall, I hated {title}."}

TRAITS: dict[str, tuple[str, ...]] = {
    "sentiment": ("positive", "negative"),
    "length": ("concise", "verbose"),
    "focus": ("acting", "plot"),
}
TRAIN_TYPES = tuple((t, v) for t, values in TRAITS.items() for v in values)  # 6 single-trait types
TEST_TYPES = tuple((("sentiment", s), ("length", n)) for s in TRAITS["sentiment"] for n in TRAITS["length"])


class ReviewsOptions(DomainOptions):
    movies: int = Field(200, ge=1, le=len(ADJECTIVES) * len(NOUNS) * len(GENRES))
    test_fraction: float = Field(0.2, ge=0, le=1, description="Share of users of the 4 interpolated types.")
    pairing: Literal["pool", "minimal"] = Field(
        "pool",
        description="'pool': users compare any two reviews of a movie; 'minimal': a review and a copy "
        "with one trait (sentiment, length or focus) changed, `answers_per_question` such bases.",
    )


class Reviews(Domain):
    name = "reviews"
    columns = tuple(f"{t}={v}" for t, values in TRAITS.items() for v in values) + (RELEVANCE,)
    Options = ReviewsOptions
    options: ReviewsOptions
    column_bounds = {"sentiment=positive": (-1.0, 1.0), "sentiment=negative": (-1.0, 1.0)}
    description_patterns = {
        "sentiment": {"positive": r"\bpositive\b", "negative": r"\bnegative\b"},
        "length": {"concise": r"\bshort\b", "verbose": r"\blong\b"},
        "focus": {"acting": r"\bfocus on the acting\b", "plot": r"\bfocus on the plot\b"},
    }

    @cached_property
    def _movies(self) -> list[tuple[str, str, str]]:
        # A fixed stride walk through all (genre, adjective, noun) triples: varied and seed-free.
        every = [(g, a, n) for g in GENRES for a in ADJECTIVES for n in NOUNS]
        step = 7919  # prime, coprime with len(every) = 3200
        return [every[(i * step) % len(every)] for i in range(self.options.movies)]

    def questions(self) -> list[str]:
        return [QUESTION.format(genre=g, adj=a, noun=n) for g, a, n in self._movies]

    def keywords(self, question: str) -> list[str]:
        toks = words(question)
        known = [w for w in toks if w in _KNOWN]
        return known or content_words(question)

    def answers(self, question_index: int, rng: random.Random) -> list[str]:
        genre, adj, noun = self._movies[question_index]
        return self._distinct_pool(lambda: write_review(f"The {adj} {noun}", genre, rng))

    def answer_pairs(
        self, question_index: int, rng: random.Random
    ) -> tuple[list[str], list[tuple[int, int]] | None]:
        if self.options.pairing == "pool":
            return super().answer_pairs(question_index, rng)
        genre, adj, noun = self._movies[question_index]
        return minimal_review_pairs(f"The {adj} {noun}", genre, self.options.answers_per_question, rng)

    def writer(self, rng: random.Random) -> Callable[[int], str]:
        style = draw_review_style(rng)

        def write(question_index: int) -> str:
            genre, adj, noun = self._movies[question_index]
            return write_review(f"The {adj} {noun}", genre, rng, style)

        return write

    def featurize(self, question: str, text: str) -> list[float]:
        toks = words(text)
        counts = Counter(toks)
        sentiment = max(-1.0, min(1.0, (count_words(counts, POSITIVE) - count_words(counts, NEGATIVE)) / 2))
        verbose = ramp(len(toks), 15, 45)
        relevance = keyword_coverage(set(toks), self.keywords(question), needed=2)
        acting = capped(count_words(counts, ACTING), 2)
        plot = capped(count_words(counts, PLOT), 2)
        return [sentiment, -sentiment, 1 - verbose, verbose, acting, plot, relevance]

    def sample_persona(self, rng: random.Random, decided: Callable[[Traits], float]) -> Persona:
        chosen = (
            list(rng.choice(TEST_TYPES))
            if rng.random() < self.options.test_fraction
            else [rng.choice(TRAIN_TYPES)]
        )
        return Persona({t: {"value": v, "weight": round(rng.uniform(0.8, 1.2), 2)} for t, v in chosen})

    def describe(self, traits: Traits) -> str:
        length = {"concise": "short ", "verbose": "long "}.get(traits.get("length", {}).get("value"), "")
        sentiment = traits.get("sentiment", {}).get("value")
        head = f"{length}{sentiment + ' ' if sentiment else ''}reviews"
        focus = traits.get("focus", {}).get("value")
        return f"This user prefers {head}{f' that focus on the {focus}' if focus else ''}."

    def split(self, traits: Traits) -> str:
        return "test" if len(traits) > 1 else "train"

    def group(self, traits: Traits) -> str:
        return "+".join(traits[t]["value"] for t in TRAITS if t in traits)


_KNOWN = frozenset(w.lower() for w in (*ADJECTIVES, *NOUNS, *GENRES))


ReviewStyle = tuple[str, str, bool]  # sentiment (positive/negative/mixed), focus (acting/plot/both), verbose


def draw_review_style(rng: random.Random) -> ReviewStyle:
    return (
        rng.choice(("positive", "negative", "mixed")),
        rng.choice(("acting", "plot", "both")),
        rng.random() < 0.5,
    )


def write_review(title: str, genre: str, rng: random.Random, style: ReviewStyle | None = None) -> str:
    """A review of the movie; its style drawn with `rng` unless given (a writer keeps one style)."""
    sentiment, focus, verbose = style or draw_review_style(rng)
    n_opinions = 3 if verbose else 1
    sentences = []
    for i in range(n_opinions):
        s = sentiment if sentiment != "mixed" else ("positive", "negative")[i % 2]
        f = focus if focus != "both" else ("acting", "plot")[(i + 1) % 2]
        sentences.append(rng.choice(SENTENCES[(s, f)]))
    if sentiment == "mixed" and not verbose:
        f = focus if focus != "both" else "plot"
        sentences.append(rng.choice(SENTENCES[("negative", f)]))
    if verbose:
        sentences[1:1] = rng.sample(FILLER, 1)
        if sentiment != "mixed":
            sentences.append(CLOSING[sentiment])
    sentences = list(dict.fromkeys(sentences))
    if "{title}" not in " ".join(sentences):
        sentences.insert(0, "{title} is a {genre} movie.")
    return " ".join(s.format(title=title, genre=genre) for s in sentences)


def minimal_review_pairs(
    title: str, genre: str, bases: int, rng: random.Random
) -> tuple[list[str], list[tuple[int, int]]]:
    """`bases` reviews of one clear style each (positive or negative, acting or plot, concise or
    verbose), each followed by three variants that change one of those traits and keep the rest, its
    sentences drawn from the same random state: the (base, variant) pairs. As for roleplay
    (`fspo.sim.roleplay.minimal_pair_pool`), a user's choice on such a pair names one of its values."""
    pool: list[str] = []
    pairs: list[tuple[int, int]] = []
    flips = (
        lambda s: ({"positive": "negative", "negative": "positive"}[s[0]], s[1], s[2]),
        lambda s: (s[0], {"acting": "plot", "plot": "acting"}[s[1]], s[2]),
        lambda s: (s[0], s[1], not s[2]),
    )
    for _ in range(bases):
        style = (rng.choice(("positive", "negative")), rng.choice(("acting", "plot")), rng.random() < 0.5)
        wording = rng.getrandbits(32)  # the same sentence choices for the base and its variants
        base = len(pool)
        pool.append(write_review(title, genre, random.Random(wording), style))
        for flip in flips:
            pool.append(write_review(title, genre, random.Random(wording), flip(style)))
            pairs.append((base, len(pool) - 1))
    return pool, pairs
