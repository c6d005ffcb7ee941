"""Plain text of a domain for pre-training the embedded small language model.

Why a separate corpus: the default model is trained from scratch on CPU in minutes, so it must
first learn the domain's tiny language (questions, answers in every style, user descriptions)
before it can learn preferences over it. Drawing fresh answer pools round after round gives far
more distinct texts than one simulation's pools, from the same sentence templates.
"""

from __future__ import annotations

import random
from typing import Any

from fspo.errors import UserError
from fspo.sim.base import get_domain


def corpus(
    domain: str, seed: int = 0, n: int = 10_000, descriptions: float = 0.1, **options: Any
) -> list[str]:
    """`n` documents: mostly ``question + "\\n" + answer``, plus a share of user descriptions.

    Deterministic for a seed. `descriptions` is the share of documents that are persona
    descriptions (what RAT teaches the model to write).
    """
    if n < 0:
        raise UserError(f"corpus size must be >= 0, got {n}")
    if not 0 <= descriptions <= 1:
        raise UserError(f"descriptions must be a share in [0, 1], got {descriptions}")
    dom = get_domain(domain, **options)
    rng = random.Random(seed)
    questions = dom.questions()
    n_desc = round(n * descriptions)
    docs = [dom.describe(dom.sample_persona(rng, lambda _traits: 1.0).traits) for _ in range(n_desc)]
    while len(docs) < n:
        order = list(range(len(questions)))
        rng.shuffle(order)
        for qi in order:
            for answer in dom.answers(qi, rng):
                docs.append(f"{questions[qi]}\n{answer}")
            if len(docs) >= n:
                break
    docs = docs[:n]
    rng.shuffle(docs)
    return docs
