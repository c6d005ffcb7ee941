"""The order of training batches: random, or length-bucketed, and always resumable.

`BatchOrder` is what the trainer asks for micro-batch m. Its epochs are `batch_order` (random
batches) or `epoch_batches` (length-bucketed ones), each a pure function of (seed, epoch), so
`--resume` continues with exactly the batch an uninterrupted run would have taken next, and each
global batch (``batch_size x processes`` rows) is split across DDP processes.

Why buckets: episodes differ in length by a few shots' worth of tokens, and a batch is padded to its
longest row. Random batches of FSPO episodes are 5-35% padding (more with prefix sharing, whose rows
hold both answers); sorting by length inside a window of batches brings that to a few percent without
turning the epoch into a short-to-long curriculum.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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
    dropped, as in `batch_order`: every epoch has ``len(lengths) // (batch_size *
    world)`` batches whatever the lengths, which is what lets the step number alone locate a batch.
    """
    global_bs = batch_size * world
    glob = bucketed_batches(lengths, global_bs, seed=seed * 1_000_003 + epoch)
    return [b[rank * batch_size : (rank + 1) * batch_size] for b in glob if len(b) == global_bs]


def batch_order(
    n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """The random batches of one epoch for process `rank`: a pure function of (seed, epoch).

    Why not a shuffling DataLoader: resuming after a kill must continue with exactly the batch the
    killed run would have taken next. With the order a function of (seed, epoch) and the position a
    function of the step, a checkpoint only needs the step. Each global batch of `batch_size*world`
    examples is split across processes; an incomplete final batch is dropped (as DDP does).
    """
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    global_bs = batch_size * world
    batches = []
    for start in range(0, n - global_bs + 1, global_bs):
        chunk = perm[start : start + global_bs]
        batches.append(chunk[rank * batch_size : (rank + 1) * batch_size])
    return batches


@dataclass
class BatchOrder:
    """The units of each micro-batch of process `rank`: a pure function of (seed, step), hence resumable.

    Micro-batch m is batch ``m % batches_per_epoch`` of epoch ``m // batches_per_epoch``; the
    current epoch's batches are kept, the previous epoch's dropped. `lengths` (a unit's longest row)
    are what `bucketed` order sorts by.
    """

    lengths: list[int]
    batch_size: int
    seed: int
    bucketed: bool
    batches_per_epoch: int
    rank: int = 0
    world: int = 1
    _epoch: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    def epoch(self, epoch: int) -> list[list[int]]:
        if self.bucketed:
            return epoch_batches(self.lengths, self.batch_size, epoch, self.seed, self.rank, self.world)
        return batch_order(len(self.lengths), self.batch_size, epoch, self.seed, self.rank, self.world)

    def micro_batch(self, m: int) -> list[int]:
        epoch, b = divmod(m, self.batches_per_epoch)
        if epoch not in self._epoch:
            self._epoch = {epoch: self.epoch(epoch)}
        return self._epoch[epoch][b]
