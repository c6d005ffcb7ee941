"""A toy preference world whose answer is known, for tests, benchmarks and smoke runs.

Each user has a favourite colour; of two answers to a question, the user prefers the one naming that
colour. Only the shots tell a model which colour a user likes, so ranking a new pair of this user is
the smallest task on which few-shot preference learning has something to learn, and
`toy_reward_for` judges any text exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from fspo.data.schema import Episode, Preference, User

COLOURS = ("red", "blue", "green", "yellow")
THINGS = ("coat", "hat", "car", "wall", "cup", "bike", "door", "lamp")


def toy_users(n: int = 8, prefix: str = "u") -> list[User]:
    """`n` users, ids `{prefix}0`, `{prefix}1`, ...; user i's favourite colour (`metadata["fav"]`) is
    COLOURS[i % 4]."""
    return [
        User(
            user_id=f"{prefix}{i}",
            description=f"This user loves the colour {COLOURS[i % len(COLOURS)]}.",
            metadata={"fav": COLOURS[i % len(COLOURS)]},
        )
        for i in range(n)
    ]


def _preference(rng: random.Random, user: User, thing: str, question: str, words: str = "") -> Preference:
    """`user` prefers the answer naming their colour over one naming another colour drawn from `rng`."""
    fav = user.metadata["fav"]
    other = rng.choice([c for c in COLOURS if c != fav])
    return Preference(
        user_id=user.user_id,
        question=question,
        chosen=f"Get the{words} {fav} {thing}.",
        rejected=f"Get the{words} {other} {thing}.",
    )


def toy_episodes(users: Sequence[User], per_user: int = 6, shots: int = 2, seed: int = 0) -> list[Episode]:
    """`per_user` episodes a user, each a shuffle of the same `shots + 1` preferences, in random order.

    Every episode of a user draws its shots and query from one small set of questions, so a model sees
    the same question as a shot in one episode and as the query in another.
    """
    rng = random.Random(seed)
    episodes = []
    for u, user in enumerate(users):
        things = [THINGS[(u + i) % len(THINGS)] for i in range(shots + 1)]
        prefs = [_preference(rng, user, t, f"Which {t} should I get?") for t in things]
        for j in range(per_user):
            rng.shuffle(prefs)
            episodes.append(
                Episode(
                    episode_id=f"{user.user_id}-{j}",
                    user_id=user.user_id,
                    shots=prefs[:shots],
                    query=prefs[shots],
                    description=user.description,
                )
            )
    rng.shuffle(episodes)
    return episodes


def toy_preferences(users: Sequence[User], per_user: int = 12, seed: int = 0) -> list[Preference]:
    """`per_user` preferences a user, each on its own question: input for `fspo.data.episodes.build_episodes`.

    Answers come in four lengths, so length bucketing has something to sort.
    """
    rng = random.Random(seed)
    prefs = []
    for u, user in enumerate(users):
        for i in range(per_user):
            thing = THINGS[(u + i) % len(THINGS)]
            question = f"Which {thing} should I get for room {i}?"
            prefs.append(_preference(rng, user, thing, question, words=" very" * (i % 4)))
    return prefs


def toy_corpus(episodes: Sequence[Episode]) -> list[str]:
    """One short document per preference in the episodes: text to train a tokenizer and tiny model on."""
    return [
        f"## Question \n{p.question}\n## Response \n{p.chosen}\n{p.rejected}\n"
        for e in episodes
        for p in [*e.shots, e.query]
    ]


def toy_reward_for(user: User) -> Callable[[str, str], float]:
    """A `reward_for` in the shape of `fspo.sim`'s: +1 for each word of the text that is the favourite."""
    fav = user.metadata["fav"]
    return lambda question, text: float(text.split().count(fav))
