"""Length-bucketed batches: rows of similar length in each batch, so little of a batch is padding.

Why: episodes differ in length by a few shots' worth of tokens, and a batch is padded to its longest
row. Random batches of FSPO episodes are 5-35% padding (more with prefix sharing, whose rows hold
both answers); sorting by length inside a window of batches brings that to a few percent without
turning the epoch into a short-to-long curriculum.

`epoch_batches` is what the trainer uses: a pure function of (seed, epoch), like
`fspo.train.data.batch_order`, so `--resume` continues with exactly the batch an uninterrupted run
would have taken next, and each global batch (``batch_size x processes`` rows of similar length) is
split across DDP processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

# Sorting window, in batches: wide enough that neighbours in length are found, narrow enough that
# the epoch order stays random at large scale.
MEGA_BATCHES = 32


def bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    mega_batches: int = MEGA_BATCHES,
    seed: int = 0,
    shuffle: bool = True,
) -> list[list[int]]:
    """Batches of indices with little padding: sort by length inside mega-batches, then shuffle batches.

    Sorting only within a window of `mega_batches` batches keeps the data order random at large
    scale (no epoch-long curriculum from short to long) while rows of a batch have similar lengths.
    Only the final batch of each window can be smaller than `batch_size`.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    window = batch_size * max(1, mega_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> float:
    """Share of the padded batch tensors that is padding: 1 - real tokens / (rows x longest row)."""
    real = padded = 0
    for batch in batches:
        if batch:
            real += sum(lengths[i] for i in batch)
            padded += len(batch) * max(lengths[i] for i in batch)
    return 1.0 - real / padded if padded else 0.0


def epoch_batches(
    lengths: Sequence[int], batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """The length-bucketed batches of one epoch for process `rank`: a pure function of (seed, epoch).

    Global batches of ``batch_size * world`` items are bucketed together and each process takes its
    slice, so all processes step through rows of similar length. Incomplete global batches are
    dropped, as in `fspo.train.data.batch_order`: every epoch has ``len(lengths) // (batch_size *
    world)`` batches whatever the lengths, which is what lets the step number alone locate a batch.
    """
    global_bs = batch_size * world
    glob = bucketed_batches(lengths, global_bs, seed=seed * 1_000_003 + epoch)
    return [b[rank * batch_size : (rank + 1) * batch_size] for b in glob if len(b) == global_bs]
