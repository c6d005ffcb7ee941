"""Prefix-shared log-probabilities: score both answers of a pair against ONE pass over the prompt.

Why: an FSPO prompt (the user's shots) is 10-40x longer than an answer, and the plain DPO/IPO step
runs it twice (prompt+chosen and prompt+rejected). Here one row holds ``[prompt | chosen | rejected]``
with a 4D block mask (rejected cannot see chosen) and position ids that restart after the prompt,
so every answer token sees exactly what it sees in the plain path: same log-probabilities, same
gradients (they flow through the shared prefix), about 2(P+R)/(P+2R) times less work.

A row may also carry K held-out questions of the same user (``[shots | q1 | c1 | r1 | q2 | c2 | r2 ...]``):
each question sees the shots, each answer sees the shots and its own question, nothing of q2 sees q1.

This module holds the scorer (`plain_pair_logps`, the reference semantics; `shared_pair_logps`;
`pair_logps`, which picks one) of the token records in `fspo.infer.pairs`. Each returns the
``(chosen, rejected)`` `SeqLogps` of every pair, flattened over contexts, in order. Its neighbours:
`fspo.train.contexts` (episodes -> contexts of K questions), `fspo.train.buckets` (length-bucketed
batches), `fspo.train.refcache` (reference log-probs computed once, cached).

Why hand-written: no maintained trainer (TRL, OpenRLHF, torchtune) has prefix sharing; transformers
gives the part that matters, a model forward that takes a custom 4D mask and per-row logit positions
(``logits_to_keep`` as a 2D index tensor), for sdpa and eager attention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fspo.infer.pairs import ContextTokens, PairTokens, SeqLogps, as_context

log = logging.getLogger(__name__)

# Model families whose attention reads a custom 4D mask as-is (transformers' `create_causal_mask`
# returns a 4D tensor unchanged) and that have no sliding window or other mask of their own.
# Verified by tests: llama, gpt2. The others share Llama's attention code.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "gpt2", "mistral", "qwen2", "qwen3"})
SUPPORTED_ATTENTION = frozenset({"sdpa", "eager"})
_warned: set[str] = set()


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------


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
    """Two rows per pair, prompt+chosen then prompt+rejected, positions 0.. from the first real token.

    An empty target gets no row (log-prob 0, count 0): SFT scores chosen answers only.
    """
    specs = []
    for i, p in enumerate(pairs):
        if not p.prompt:
            raise ValueError(
                "a pair needs a non-empty prompt (its last token predicts the first answer token)"
            )
        for which, target in ((0, p.chosen), (1, p.rejected)):
            if not target:
                continue
            s = _RowSpec()
            s.add(p.prompt, 0, 0, 0)
            s.add(target, len(p.prompt), 1, 2 + which)
            s.score(len(p.prompt), target, len(p.prompt) - 1, 2 * i + which)
            specs.append(s)
    return _finish(specs, pad_id, padding_side, len(pairs), shared=False)


def build_shared_rows(
    contexts: Sequence[PairTokens | ContextTokens], pad_id: int, padding_side: str = "right"
) -> _Rows:
    """One row per context: ``[shared | q1 | c1 | r1 | q2 | c2 | r2 ...]`` with restarting positions.

    An empty answer is left out of the row and scores 0 over 0 tokens (SFT passes no rejected answer).
    """
    specs, pair = [], 0
    for ctx in map(as_context, contexts):
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
                if not target:
                    continue
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


def _config(model: Any) -> Any:
    """The model's config, also through a DDP wrapper (which has no `config`; its `module` has)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def _attention(model: Any) -> str:
    return getattr(_config(model), "_attn_implementation", None) or "eager"


def prefix_sharing_support(model: Any) -> tuple[bool, str]:
    """Whether `model` can take the shared path, and why not when it cannot."""
    cfg = _config(model)
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


def _score(model: Any, rows: _Rows, mask: torch.Tensor) -> tuple[SeqLogps, SeqLogps]:
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
    return SeqLogps(sums[0::2], counts[0::2]), SeqLogps(sums[1::2], counts[1::2])


def plain_pair_logps(
    model: Any, pairs: Sequence[PairTokens], pad_id: int, padding_side: str = "right"
) -> tuple[SeqLogps, SeqLogps]:
    """Reference semantics: prompt+chosen and prompt+rejected as two rows, summed target log-probs.

    Equivalent to labels = -100 on prompt and padding with the usual shift; logits are computed only
    where a target is predicted (the same saving the shared path gets), so timings compare fairly.
    """
    rows = build_plain_rows(pairs, pad_id, padding_side)
    return _score(model, rows, rows.valid.long())


def shared_pair_logps(
    model: Any, contexts: Sequence[PairTokens | ContextTokens], pad_id: int, padding_side: str = "right"
) -> tuple[SeqLogps, SeqLogps]:
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
) -> tuple[SeqLogps, SeqLogps]:
    """What the trainer calls: the shared path when the model supports it, else the plain one.

    The fallback is logged once per reason. Results are per pair, in context order, the same either way.
    """
    if shared:
        ok, reason = prefix_sharing_support(model)
        if ok:
            return shared_pair_logps(model, contexts, pad_id, padding_side)
        _warn_once(reason)
    pairs = [p for c in contexts for p in as_context(c).pairs()]
    return plain_pair_logps(model, pairs, pad_id, padding_side)
