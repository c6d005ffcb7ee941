"""Reference log-probs, computed once per episode and cached in a sidecar file beside the episodes.

Why: DPO/IPO compare the policy with a frozen reference model on every pair. Scoring the reference
inside every step costs a forward pass per step and, without LoRA, a second copy of the model in
memory; yet its values depend only on the reference weights and the exact tokens. So they are
computed once (eval mode, no grad, length-bucketed batches), saved, and reused by every later run on
the same data and reference: a sweep over β, learning rate or loss, a second epoch, a resumed run.

A cache must not change results, and a padded batched forward pass gives an episode slightly
different floats (~1e-5) in another batch (other row count, other padded length, other kernels).
So the batches are fixed before the cache is read: `reference_batches` cuts the run's whole item
list into length-bucketed batches, a function of the items and the batch size alone, and a batch
is reused only if every member was stored from that very batch (`batch_key`); if any member is
missing, the whole batch is computed again. Values are then exactly those of an empty cache,
whatever an earlier run (a prefix of the file, another subset, another batch size) left behind.
Scoring each episode alone would give the same guarantee more simply, but measured on the tiny
model (256 episodes of 87-486 tokens) it was 1.5-2x slower on 2 CPU threads (1.0-1.3x on one;
batching wins more on a GPU), for the one pass that touches every episode.

The sidecar is ``<episodes file>.reflogps-<digest>.json``, one per reference (digest = model
fingerprint + template options), so runs with different reference models on the same episodes do
not overwrite each other. Inside, each value is stored under its episode id together with a key =
sha256(model fingerprint, options, the pair's exact token ids) and the key of the batch it was
computed in: a changed episode, model, tokenizer or template option is recomputed (with its batch),
an unchanged one in an unchanged batch never is.

Why hand-written: TRL's `precompute_ref_log_probs` keeps the values in its datasets cache, keyed
by the whole dataset's fingerprint and a hash of the model: episodes re-sampled, one episode
changed, or another batch size recompute everything, and it scores every pair as two full
sequences. Here the unit is the pair (and its batch), and the values come from the prefix-shared
rows the training itself uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError
from fspo.core.files import atomic_write_text
from fspo.core.outputs import RUN_FILE
from fspo.infer.logps import eval_mode
from fspo.infer.pairs import ContextTokens, PairTokens, as_context
from fspo.infer.prefix import pair_logps
from fspo.train.buckets import bucketed_batches

log = logging.getLogger(__name__)

Keyed = tuple[str, PairTokens] | tuple[Sequence[str], ContextTokens]
Values = dict[str, tuple[float, float]]


def _ids_and_pairs(item: Keyed) -> tuple[list[str], list[PairTokens]]:
    key, tokens = item
    ids = [key] if isinstance(key, str) else list(key)
    return ids, as_context(tokens).pairs()


def compute_reference_logps(
    model: Any, batches: Iterable[Sequence[Keyed]], pad_id: int, shared: bool = True
) -> Values:
    """Summed (chosen, rejected) log-probs of the reference model per episode id, in eval mode.

    Each batch item is ``(episode_id, PairTokens)`` or ``(episode_ids, ContextTokens)`` (one id per
    question of the context).
    """
    out: Values = {}
    with eval_mode(model):
        for batch in batches:
            ids: list[str] = []
            contexts = []
            for key, item in batch:
                ids.extend([key] if isinstance(key, str) else list(key))
                contexts.append(item)
            chosen, rejected = pair_logps(model, contexts, pad_id, shared=shared)
            if len(ids) != len(chosen.sum):
                raise ValueError(f"{len(ids)} episode ids for {len(chosen.sum)} pairs")
            values = zip(chosen.sum.float().tolist(), rejected.sum.float().tolist(), strict=True)
            out.update(zip(ids, values, strict=True))
    return out


def model_fingerprint(folder: str | Path) -> str:
    """A digest of a model folder's config and weights.

    The full content is hashed: a fine-tune keeps file names and sizes. ~1 s per GB, once per run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder not found: {folder}")
    h = hashlib.sha256()
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix in {".json", ".safetensors", ".bin", ".gguf"} and p.is_file() and p.name != RUN_FILE
    )
    if not files:
        raise UserError(f"no model files (config.json, *.safetensors) in {folder}")
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:32]


def _options_json(options: Any) -> str:
    if hasattr(options, "model_dump_json"):
        return options.model_dump_json()
    return json.dumps(options, sort_keys=True, default=str)


def episode_key(model_fp: str, options: Any, pair: PairTokens) -> str:
    """Invalidation key of one cached value: model, template options and the exact tokens."""
    blob = json.dumps(
        [model_fp, _options_json(options), list(pair.prompt), list(pair.chosen), list(pair.rejected)]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def reference_batches(items: Sequence[Keyed], batch_size: int) -> list[list[Keyed]]:
    """The batches the reference scores `items` in: length-bucketed, in file order, never shuffled.

    A function of the items (tokens, in order) and `batch_size` only, never of what a cache holds,
    so an item's batch, and with it its floats, is the same in every run over the same items.
    """
    lengths = [len(as_context(it)) for _, it in items]
    return [[items[i] for i in b] for b in bucketed_batches(lengths, batch_size, shuffle=False)]


def sidecar_path(episodes_path: str | Path, model_fp: str, options: Any = None) -> Path:
    """Where an episode file's reference log-probs under one reference live, beside the file.

    ``<episodes>.reflogps-<digest>.json`` with digest = sha256(model fingerprint, options), so each
    reference (model + template) has its own file and concurrent runs with other references cannot
    drop each other's entries.
    """
    p = Path(episodes_path)
    digest = hashlib.sha256(json.dumps([model_fp, _options_json(options or {})]).encode()).hexdigest()[:12]
    return p.with_name(f"{p.name}.reflogps-{digest}.json")


class ReferenceCache:
    """Cached reference log-probs keyed by episode id, each valid only under its `episode_key`.

    A value is reused only when the model fingerprint, template options and tokens all match, so
    changed data or a changed model recompute just the affected episodes; resampled episodes with
    new ids are simply new entries.
    """

    VERSION = 2  # 2: each entry records its batch (`batch_key`); version-1 entries are recomputed

    def __init__(self, path: str | Path, model_fp: str, options: Any = None):
        self.path = Path(path)
        self.model_fp = model_fp
        self.options = options or {}
        self._entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise UserError(
                    f"{self.path}: not a reference log-prob cache ({e}); delete it to recompute"
                ) from e
            if isinstance(data, dict) and data.get("version") == self.VERSION:
                self._entries = data.get("entries", {})

    def key(self, pair: PairTokens) -> str:
        return episode_key(self.model_fp, self.options, pair)

    def batch_key(self, batch: Sequence[Keyed], shared: bool) -> str:
        """What a value computed in `batch` depends on besides its own tokens: every row of the batch
        (each context's shared ids and questions, in order) and the scoring path (`shared` rows)."""
        rows = []
        for _, item in batch:
            ctx = as_context(item)
            questions = [[list(q.question), list(q.chosen), list(q.rejected)] for q in ctx.items]
            rows.append([list(ctx.shared), questions])
        blob = json.dumps([self.model_fp, _options_json(self.options), shared, rows])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, episode_id: str, pair: PairTokens, batch: str) -> tuple[float, float] | None:
        e = self._entries.get(episode_id)
        if e is None or e.get("key") != self.key(pair) or e.get("batch") != batch:
            return None
        return e["chosen"], e["rejected"]

    def put(self, episode_id: str, pair: PairTokens, value: tuple[float, float], batch: str) -> None:
        self._entries[episode_id] = {
            "key": self.key(pair),
            "batch": batch,
            "chosen": value[0],
            "rejected": value[1],
        }

    def lookup(
        self, batches: Sequence[Sequence[Keyed]], shared: bool = True
    ) -> tuple[Values, list[Sequence[Keyed]]]:
        """(values of the batches whose every pair is cached from that batch, the other batches)."""
        hits: Values = {}
        missing: list[Sequence[Keyed]] = []
        for batch in batches:
            bkey = self.batch_key(batch, shared)
            pairs = [ip for item in batch for ip in zip(*_ids_and_pairs(item), strict=True)]
            got = {i: self.get(i, p, bkey) for i, p in pairs}
            if all(v is not None for v in got.values()):
                hits.update(got)  # type: ignore[arg-type]
            else:
                missing.append(batch)
        return hits, missing

    def save(self) -> None:
        """Atomic, compact JSON (floats round-trip exactly: a cached value is the computed one).

        Entries another run saved since this cache was read are kept (ours win on the same id), so
        two runs sharing the sidecar, e.g. over different subsets of the episodes, do not undo each
        other's work.
        """
        entries = self._entries
        if self.path.exists():
            try:
                disk = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(disk, dict) and disk.get("version") == self.VERSION:
                    entries = {**disk.get("entries", {}), **self._entries}
            except ValueError:
                pass  # unreadable: replaced by ours
        atomic_write_text(self.path, json.dumps({"version": self.VERSION, "entries": entries}) + "\n")

    def __len__(self) -> int:
        return len(self._entries)


def reference_logps(
    model: Any,
    items: Sequence[Keyed],
    pad_id: int,
    cache: ReferenceCache | None = None,
    batch_size: int = 8,
    shared: bool = True,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[list[Values]], list[Values]] | None = None,
    context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[Values, int]:
    """Reference log-probs of every item, computing only what `cache` lacks; (values, number computed).

    Items are scored in `reference_batches(items, batch_size)`, whatever the cache holds; a batch
    with any pair missing is computed whole (see the module docstring), so the values equal those
    of a run without a cache, bit for bit.

    Distributed: every process passes the same `items` (and sees the same cache file), computes
    every `world`-th missing batch from its `rank`, and `gather` (e.g. accelerate's `gather_object`)
    hands each process all the fresh values; process 0 saves the cache. The batches are the same
    for any number of processes. A cache that cannot be written (read-only folder) is reported
    once and the values are used from memory.
    `context` wraps the forward passes (the trainer's autocast, so mixed precision matches training).
    """
    batches = reference_batches(items, batch_size)
    hits, missing = cache.lookup(batches, shared) if cache is not None else ({}, batches)
    mine = missing[rank::world] if world > 1 else missing
    fresh: Values = {}
    if mine:
        with context():
            fresh = compute_reference_logps(model, mine, pad_id, shared=shared)
    if missing and world > 1 and gather is not None:  # `missing` is the same on every process
        fresh = {k: v for part in gather([fresh]) for k, v in part.items()}
    if cache is not None and missing and rank == 0:
        for batch in missing:
            bkey = cache.batch_key(batch, shared)
            for item in batch:
                ids, pairs = _ids_and_pairs(item)
                for i, p in zip(ids, pairs, strict=True):
                    cache.put(i, p, fresh[i], bkey)
        try:
            cache.save()
        except OSError as err:
            log.warning("reference log-probs not saved to %s (%s); using them from memory", cache.path, err)
    return {**hits, **fresh}, sum(len(_ids_and_pairs(it)[0]) for b in missing for it in b)


def cached_reference_logps(
    model: Any,
    items: Sequence[Keyed],
    cache: ReferenceCache,
    pad_id: int,
    batch_size: int = 8,
    shared: bool = True,
) -> Values:
    """Reference log-probs for `items`, computing only the episodes the cache lacks, then saving it."""
    return reference_logps(model, items, pad_id, cache, batch_size, shared)[0]
