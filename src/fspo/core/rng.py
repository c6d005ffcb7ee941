"""Named random streams: one `random.Random` per (seed, item, ...) tuple.

Why: a draw that depends only on its own name (a user's episodes, a study participant's pairs) stays
the same whatever else is drawn or in which order, so adding a user or a participant never changes
another's. `random.Random` hashes a string seed with SHA-512, which is stable across processes and
Python versions (unlike `hash()`), so no hashing of our own is needed.
"""

from __future__ import annotations

import random


def seeded_rng(seed: int, *parts: object) -> random.Random:
    """The random stream named by `seed` and `parts` (joined with ':')."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))
