"""Prefix-shared log-probabilities: score both answers of a pair against ONE pass over the prompt.

Why: an FSPO prompt (the user's shots) is 10-40x longer than an answer, and the plain DPO/IPO step
runs it twice (prompt+chosen and prompt+rejected). Here one row holds ``[prompt | chosen | rejected]``
with a 4D block mask (rejected cannot see chosen) and position ids that restart after the prompt,
so every answer token sees exactly what it sees in the plain path: same log-probabilities, same
gradients (they flow through the shared prefix), about 2(P+R)/(P+2R) times less work.

A row may also carry K held-out questions of the same user (``[shots | q1 | c1 | r1 | q2 | c2 | r2 ...]``):
each question sees the shots, each answer sees the shots and its own question, nothing of q2 sees q1.

Contents (one module because of file ownership; the sections are independent):
  * token records (`PairTokens`, `ContextTokens`) and the tokenizing helpers;
  * `plain_pair_logps` (the reference semantics) and `shared_pair_logps` / `pair_logps`;
  * length-bucketed batching and its padding fraction;
  * reference log-probs computed once and cached in a sidecar file (`ReferenceCache`).

Why hand-written: no maintained trainer (TRL, OpenRLHF, torchtune) has prefix sharing; transformers
gives the part that matters, a model forward that takes a custom 4D mask and per-row logit positions
(``logits_to_keep`` as a 2D index tensor), for sdpa and eager attention.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fspo.errors import UserError
from fspo.files import atomic_write_json

log = logging.getLogger(__name__)

# Model families whose attention reads a custom 4D mask as-is (transformers' `create_causal_mask`
# returns a 4D tensor unchanged) and that have no sliding window or other mask of their own.
# Verified by tests: llama, gpt2. The others share Llama's attention code.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "gpt2", "mistral", "qwen2", "qwen3"})
SUPPORTED_ATTENTION = frozenset({"sdpa", "eager"})
_warned: set[str] = set()


# --------------------------------------------------------------------------------------------
# Token records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairTokens:
    """One preference pair as token ids. Targets already end with EOS (the plain path's layout)."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


@dataclass(frozen=True)
class QuestionTokens:
    """One held-out question of a context: its own prompt tail and its two answers."""

    question: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


@dataclass(frozen=True)
class ContextTokens:
    """A shared prefix (the user's shots) and K questions scored against it in one row.

    The plain equivalent of item k is ``PairTokens(shared + question_k, chosen_k, rejected_k)``.
    """

    shared: Sequence[int]
    items: Sequence[QuestionTokens]

    @classmethod
    def of(cls, pair: PairTokens) -> ContextTokens:
        return cls(pair.prompt, [QuestionTokens((), pair.chosen, pair.rejected)])

    def pairs(self) -> list[PairTokens]:
        return [PairTokens([*self.shared, *q.question], q.chosen, q.rejected) for q in self.items]

    def __len__(self) -> int:
        return len(self.shared) + sum(len(q.question) + len(q.chosen) + len(q.rejected) for q in self.items)


def _as_context(item: PairTokens | ContextTokens) -> ContextTokens:
    return ContextTokens.of(item) if isinstance(item, PairTokens) else item


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> PairTokens:
    """The trainer's tokenization (`fspo.train.logps`): [bos] + prompt ids, each target alone + eos.

    Tokenizing the targets separately keeps the prompt/target boundary identical for both answers,
    which is what makes a shared prefix possible at all.
    """
    from fspo.train.logps import prompt_token_ids, target_token_ids

    return PairTokens(
        prompt_token_ids(tokenizer, prompt),
        target_token_ids(tokenizer, chosen),
        target_token_ids(tokenizer, rejected),
    )


def tokenize_contexts(
    tokenizer: Any, episodes: Sequence[Any], options: Any = None, k: int = 1
) -> list[tuple[list[str], ContextTokens]]:
    """Render and tokenize episodes, putting up to `k` episodes with the same shots in one context.

    Returns ``(episode_ids, context)`` per context, in first-seen order. The prompt is split where
    the query's ``## Question`` block starts: that block (and anything after it, e.g. the chat
    template's assistant header) is the question segment, everything before is shared. Episodes
    whose rendered prefixes differ (other user, other shots, shots dropped by the token budget)
    never share a context. With k=1 the prompt is tokenized whole, exactly as `tokenize_pair`.
    """
    from fspo.data.template import QUESTION, TemplateOptions, render

    options = options or TemplateOptions()
    if k < 1:
        raise UserError(f"questions per context must be >= 1, got {k}")
    groups: dict[tuple[str, str], list[tuple[str, str, Any]]] = {}
    out: list[tuple[list[str], ContextTokens]] = []
    for ep in episodes:
        r = render(ep, options, tokenizer)
        if k == 1:
            pair = tokenize_pair(tokenizer, r.prompt, r.chosen, r.rejected)
            out.append(([ep.episode_id], ContextTokens.of(pair)))
            continue
        cut = r.prompt.rfind(QUESTION + ep.query.question.strip())
        shared, tail = r.prompt[:cut], r.prompt[cut:]
        bucket = groups.setdefault((ep.user_id, shared), [])
        bucket.append((ep.episode_id, tail, r))
        if len(bucket) == k:
            out.append(_group_tokens(tokenizer, shared, groups.pop((ep.user_id, shared))))
    out.extend(_group_tokens(tokenizer, shared, b) for (_, shared), b in groups.items())
    return out


def _group_tokens(tokenizer: Any, shared: str, bucket: list) -> tuple[list[str], ContextTokens]:
    from fspo.train.logps import prompt_token_ids, target_token_ids

    items = [
        QuestionTokens(
            tokenizer(tail, add_special_tokens=False)["input_ids"],
            target_token_ids(tokenizer, r.chosen),
            target_token_ids(tokenizer, r.rejected),
        )
        for _, tail, r in bucket
    ]
    return [eid for eid, _, _ in bucket], ContextTokens(prompt_token_ids(tokenizer, shared), items)


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------


@dataclass
class PairLogps:
    """Summed target log-probs per pair (flattened over contexts, in order) and target token counts.

    Counts let the loss use the paper's sum (default) or a per-token mean.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class _Rows:
    """A padded batch of rows plus, per target token, the index of the row position that predicts it."""

    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    valid: torch.Tensor  # (B, L) bool
    pred_index: torch.Tensor  # (B, T) position whose logits predict the target
    targets: torch.Tensor  # (B, T)
    slot: torch.Tensor  # (B, T) 2*pair + (0 chosen | 1 rejected), -1 for padding
    n_pairs: int
    group: torch.Tensor | None = None  # (B, L) question index + 1, 0 for shared, -1 for padding
    kind: torch.Tensor | None = None  # (B, L) 0 shared, 1 question, 2 chosen, 3 rejected


@dataclass
class _RowSpec:
    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    group: list[int] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    pred: list[int] = field(default_factory=list)
    tgt: list[int] = field(default_factory=list)
    slot: list[int] = field(default_factory=list)

    def add(self, ids: Sequence[int], start_pos: int, group: int, kind: int) -> None:
        self.ids.extend(ids)
        self.pos.extend(range(start_pos, start_pos + len(ids)))
        self.group.extend([group] * len(ids))
        self.kind.extend([kind] * len(ids))

    def score(self, first: int, ids: Sequence[int], anchor: int, slot: int) -> None:
        """Targets `ids` live at row index `first`..; the first is predicted from `anchor`."""
        self.pred.extend([anchor, *range(first, first + len(ids) - 1)])
        self.tgt.extend(ids)
        self.slot.extend([slot] * len(ids))


def _pad(rows: list[list[int]], value: int, width: int, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            start = width - len(row) if left else 0
            out[b, start : start + len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _finish(specs: list[_RowSpec], pad_id: int, padding_side: str, n_pairs: int, shared: bool) -> _Rows:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    left = padding_side == "left"
    width = max(len(s.ids) for s in specs)
    tmax = max(len(s.tgt) for s in specs)
    shift = [width - len(s.ids) if left else 0 for s in specs]
    pred = [[p + sh for p in s.pred] for s, sh in zip(specs, shift, strict=True)]
    lengths = torch.tensor([len(s.ids) for s in specs])
    idx = torch.arange(width)
    valid = (idx >= width - lengths[:, None]) if left else (idx < lengths[:, None])
    return _Rows(
        input_ids=_pad([s.ids for s in specs], pad_id, width, left),
        position_ids=_pad([s.pos for s in specs], 0, width, left),
        valid=valid,
        pred_index=_pad(pred, 0, tmax, False),
        targets=_pad([s.tgt for s in specs], 0, tmax, False),
        slot=_pad([s.slot for s in specs], -1, tmax, False),
        n_pairs=n_pairs,
        group=_pad([s.group for s in specs], -1, width, left) if shared else None,
        kind=_pad([s.kind for s in specs], -1, width, left) if shared else None,
    )


def build_plain_rows(pairs: Sequence[PairTokens], pad_id: int, padding_side: str = "right") -> _Rows:
    """Two rows per pair, prompt+chosen then prompt+rejected, positions 0.. from the first real token."""
    specs = []
    for i, p in enumerate(pairs):
        if not p.prompt:
            raise ValueError(
                "a pair needs a non-empty prompt (its last token predicts the first answer token)"
            )
        for which, target in ((0, p.chosen), (1, p.rejected)):
            s = _RowSpec()
            s.add(p.prompt, 0, 0, 0)
            s.add(target, len(p.prompt), 1, 2 + which)
            s.score(len(p.prompt), target, len(p.prompt) - 1, 2 * i + which)
            specs.append(s)
    return _finish(specs, pad_id, padding_side, len(pairs), shared=False)


def build_shared_rows(
    contexts: Sequence[PairTokens | ContextTokens], pad_id: int, padding_side: str = "right"
) -> _Rows:
    """One row per context: ``[shared | q1 | c1 | r1 | q2 | c2 | r2 ...]`` with restarting positions."""
    specs, pair = [], 0
    for ctx in map(_as_context, contexts):
        s = _RowSpec()
        s.add(ctx.shared, 0, 0, 0)
        for k, q in enumerate(ctx.items, start=1):
            # the token before the answers: the question's last, or the shared prefix's last
            anchor = len(s.ids) + len(q.question) - 1 if q.question else len(ctx.shared) - 1
            if anchor < 0:
                raise ValueError("a context needs a non-empty prompt before its first answer")
            start = len(ctx.shared) + len(q.question)  # position id of each answer's first token
            s.add(q.question, len(ctx.shared), k, 1)
            for which, target in ((0, q.chosen), (1, q.rejected)):
                s.score(len(s.ids), target, anchor, 2 * pair + which)
                s.add(target, start, k, 2 + which)
            pair += 1
        specs.append(s)
    return _finish(specs, pad_id, padding_side, pair, shared=True)


def shared_attention_mask(rows: _Rows) -> torch.Tensor:
    """The (B, 1, L, L) bool mask (True = may attend) of a shared batch, built with broadcasts only.

    Key j is visible to query i when j <= i, j is real, and j is shared, or j belongs to i's
    question and is that question's text or the same answer as i. Every position also sees itself,
    so padding rows are never fully masked (a fully masked softmax row gives NaN in some kernels).
    """
    assert rows.group is not None and rows.kind is not None
    g, k = rows.group, rows.kind
    gi, gj = g[:, :, None], g[:, None, :]
    ki, kj = k[:, :, None], k[:, None, :]
    same_block = (gi == gj) & ((kj == 1) | (kj == ki))
    visible = ((kj == 0) | same_block) & rows.valid[:, None, :] & (gi >= 0)
    causal = torch.ones(g.shape[1], g.shape[1], dtype=torch.bool).tril_()
    eye = torch.eye(g.shape[1], dtype=torch.bool)
    return ((visible & causal) | eye)[:, None]


def _attention(model: Any) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def prefix_sharing_support(model: Any) -> tuple[bool, str]:
    """Whether `model` can take the shared path, and why not when it cannot."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", "?")
    attn = _attention(model)
    if attn not in SUPPORTED_ATTENTION:
        return (
            False,
            f"attention implementation {attn!r} does not take a custom 4D mask (needs sdpa or eager)",
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        return False, f"model type {model_type!r} is not known to take a custom 4D mask"
    if getattr(cfg, "use_sliding_window", False) or (
        model_type == "mistral" and getattr(cfg, "sliding_window", None)
    ):
        return False, "the model uses sliding-window attention, which a custom 4D mask would override"
    return True, ""


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("prefix sharing off, using the plain two-sequence path: %s", reason)


def _model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _score(model: Any, rows: _Rows, mask: torch.Tensor) -> PairLogps:
    """Forward once, take logits only at the predicting positions, sum target log-probs per slot."""
    dev = _device(model)
    kwargs = dict(
        input_ids=rows.input_ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=rows.position_ids.to(dev),
        use_cache=False,
    )
    keep = rows.pred_index.to(dev)
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model without 2D `logits_to_keep`: full logits, then gather
        logits = model(**kwargs).logits
        logits = torch.take_along_dim(logits, keep[..., None], dim=1)
    logits = logits.float()
    targets = rows.targets.to(dev)
    tok = torch.gather(logits, -1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    slot = rows.slot.to(dev)
    real = slot >= 0
    sums = torch.zeros(2 * rows.n_pairs, device=dev).index_add(0, slot[real], tok[real])
    counts = torch.zeros(2 * rows.n_pairs, device=dev).index_add(0, slot[real], torch.ones_like(tok[real]))
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def plain_pair_logps(
    model: Any, pairs: Sequence[PairTokens], pad_id: int, padding_side: str = "right"
) -> PairLogps:
    """Reference semantics: prompt+chosen and prompt+rejected as two rows, summed target log-probs.

    Equivalent to labels = -100 on prompt and padding with the usual shift; logits are computed only
    where a target is predicted (the same saving the shared path gets), so timings compare fairly.
    """
    rows = build_plain_rows(pairs, pad_id, padding_side)
    return _score(model, rows, rows.valid.long())


def shared_pair_logps(
    model: Any, contexts: Sequence[PairTokens | ContextTokens], pad_id: int, padding_side: str = "right"
) -> PairLogps:
    """Prefix-shared log-probs: one row per context. No support check: see `pair_logps`."""
    rows = build_shared_rows(contexts, pad_id, padding_side)
    mask = shared_attention_mask(rows)
    if _attention(model) == "eager":  # eager adds the mask to the scores: it must be additive floats
        dtype = _model_dtype(model)
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    return _score(model, rows, mask)


def pair_logps(
    model: Any,
    contexts: Sequence[PairTokens | ContextTokens],
    pad_id: int,
    padding_side: str = "right",
    shared: bool = True,
) -> PairLogps:
    """What the trainer calls: the shared path when the model supports it, else the plain one.

    The fallback is logged once per reason. Results are per pair, in context order, the same either way.
    """
    if shared:
        ok, reason = prefix_sharing_support(model)
        if ok:
            return shared_pair_logps(model, contexts, pad_id, padding_side)
        _warn_once(reason)
    pairs = [p for c in contexts for p in _as_context(c).pairs()]
    return plain_pair_logps(model, pairs, pad_id, padding_side)


# --------------------------------------------------------------------------------------------
# Length-bucketed batching
# --------------------------------------------------------------------------------------------


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, mega_batches: int = 32, seed: int = 0, shuffle: bool = True
) -> list[list[int]]:
    """Batches of indices with little padding: sort by length inside mega-batches, then shuffle batches.

    Sorting only within a window of `mega_batches` batches keeps the data order random at large
    scale (no epoch-long curriculum from short to long) while rows of a batch have similar lengths.
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


# --------------------------------------------------------------------------------------------
# Reference log-probs, computed once and cached beside the episodes
# --------------------------------------------------------------------------------------------

Keyed = tuple[str, PairTokens] | tuple[Sequence[str], ContextTokens]


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def compute_reference_logps(
    model: Any, batches: Iterable[Sequence[Keyed]], pad_id: int, shared: bool = True
) -> dict[str, tuple[float, float]]:
    """Summed (chosen, rejected) log-probs of the reference model per episode id, in eval mode.

    Each batch item is ``(episode_id, PairTokens)`` or ``(episode_ids, ContextTokens)`` (one id per
    question of the context).
    """
    out: dict[str, tuple[float, float]] = {}
    with _eval_mode(model):
        for batch in batches:
            ids: list[str] = []
            contexts = []
            for key, item in batch:
                ids.extend([key] if isinstance(key, str) else list(key))
                contexts.append(item)
            lp = pair_logps(model, contexts, pad_id, shared=shared)
            if len(ids) != len(lp.chosen):
                raise ValueError(f"{len(ids)} episode ids for {len(lp.chosen)} pairs")
            out.update(zip(ids, zip(lp.chosen.tolist(), lp.rejected.tolist(), strict=True), strict=True))
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
        p for p in folder.iterdir() if p.suffix in {".json", ".safetensors", ".bin", ".gguf"} and p.is_file()
    )
    if not files:
        raise UserError(f"no model files (config.json, *.safetensors) in {folder}")
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:32]


def episode_key(model_fp: str, options: Any, pair: PairTokens) -> str:
    """Invalidation key of one cached value: model, template options and the exact tokens."""
    opts = (
        options.model_dump_json()
        if hasattr(options, "model_dump_json")
        else json.dumps(options, sort_keys=True)
    )
    blob = json.dumps([model_fp, opts, list(pair.prompt), list(pair.chosen), list(pair.rejected)])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def sidecar_path(episodes_path: str | Path) -> Path:
    """Where an episode file's reference log-probs live: ``<episodes>.reflogps.json`` beside it."""
    p = Path(episodes_path)
    return p.with_name(p.name + ".reflogps.json")


class ReferenceCache:
    """Cached reference log-probs keyed by episode id, each valid only under its `episode_key`.

    A value is reused only when the model fingerprint, template options and tokens all match, so
    changed data or a changed model recompute just the affected episodes; resampled episodes with
    new ids are simply new entries.
    """

    VERSION = 1

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
            if data.get("version") == self.VERSION:
                self._entries = data.get("entries", {})

    def key(self, pair: PairTokens) -> str:
        return episode_key(self.model_fp, self.options, pair)

    def get(self, episode_id: str, pair: PairTokens) -> tuple[float, float] | None:
        e = self._entries.get(episode_id)
        if e is None or e.get("key") != self.key(pair):
            return None
        return e["chosen"], e["rejected"]

    def put(self, episode_id: str, pair: PairTokens, value: tuple[float, float]) -> None:
        self._entries[episode_id] = {"key": self.key(pair), "chosen": value[0], "rejected": value[1]}

    def save(self) -> None:
        atomic_write_json(self.path, {"version": self.VERSION, "entries": self._entries})

    def __len__(self) -> int:
        return len(self._entries)


def cached_reference_logps(
    model: Any,
    items: Sequence[Keyed],
    cache: ReferenceCache,
    pad_id: int,
    batch_size: int = 8,
    shared: bool = True,
) -> dict[str, tuple[float, float]]:
    """Reference log-probs for `items`, computing only the episodes the cache lacks, then saving it."""
    result: dict[str, tuple[float, float]] = {}
    missing: list[Keyed] = []
    for key, item in items:
        ids = [key] if isinstance(key, str) else list(key)
        pairs = _as_context(item).pairs()
        hits = [cache.get(i, p) for i, p in zip(ids, pairs, strict=True)]
        if all(h is not None for h in hits):
            result.update(zip(ids, hits, strict=True))  # type: ignore[arg-type]
        else:
            missing.append((key, item))
    if missing:
        lengths = [len(_as_context(it)) for _, it in missing]
        batches = [[missing[i] for i in b] for b in bucketed_batches(lengths, batch_size, shuffle=False)]
        fresh = compute_reference_logps(model, batches, pad_id, shared=shared)
        for key, item in missing:
            ids = [key] if isinstance(key, str) else list(key)
            for i, p in zip(ids, _as_context(item).pairs(), strict=True):
                cache.put(i, p, fresh[i])
        result.update(fresh)
        cache.save()
    return result
