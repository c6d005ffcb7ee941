"""Log-probabilities of target tokens given a prompt: the one forward pass of training and evaluation.

Layout (as in the DPO reference code, which FSPO's official code builds on): the prompt and the target
are tokenized *separately* and their ids concatenated, ``[bos] prompt_ids + target_ids + [eos]``, then
right-padded. Labels are the input ids with ``-100`` on the prompt and on the padding, so only the
target (and its eos) is scored. Tokenizing separately means a generator that appends the response
heading as ids after the prompt sees exactly the token boundary used in training, and the chosen and
rejected targets share their prompt ids token for token.

Reduction: each sequence's target log-probs are returned as a *sum* together with the number of
scored tokens (`fspo.infer.pairs.SeqLogps`); ``mean = sum / count``. The paper's IPO uses ``sum``.

Pairs are scored two ways, both returning ``(chosen, rejected)`` `SeqLogps`: `compute_pair_logps`
runs chosen and rejected as one 2B batch (the trainer's ``concat``); `fspo.infer.prefix` scores both
answers against one pass over the prompt (``prefix``, and `score_pairs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from fspo.data.tokens import pad_id_of, prompt_token_ids, target_token_ids
from fspo.infer.pairs import PairTokens, Reduction, SeqLogps
from fspo.infer.prefix import pair_logps

IGNORE = -100


def collate_targets(
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    pad_id: int,
    prompt_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding).

    `prompt_spans` (per row, ``[start, end)`` positions in the prompt) are scored too: SFT's
    ``shot_loss`` puts each shot's preferred answer there.
    """
    seqs = [list(p) + list(t) for p, t in zip(prompt_ids, target_ids, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
        for a, b in prompt_spans[i] if prompt_spans is not None else ():
            labels[i, a:b] = torch.tensor(s[a:b])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def sequence_logps(logits: Tensor, labels: Tensor) -> SeqLogps:
    """Sum of log p(label_t | tokens < t) over positions whose label is not -100, per row.

    Logits at position t predict token t+1, hence the shift. Log-softmax in float32 so bf16 mixed
    precision does not lose the small differences the preference losses live on.
    """
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    token_logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(2)).squeeze(2)
    return SeqLogps((token_logps * mask).sum(-1), mask.sum(-1))


def forward_logps(model: Any, batch: dict[str, Tensor]) -> SeqLogps:
    """One forward pass of a padded batch (from `collate_targets`) → per-sequence target log-probs."""
    device = next(model.parameters()).device
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    return sequence_logps(out.logits, batch["labels"].to(device))


def compute_pair_logps(model: Any, pairs: Sequence[PairTokens], pad_id: int) -> tuple[SeqLogps, SeqLogps]:
    """Chosen and rejected log-probs from ONE forward pass over the 2B concatenated sequences.

    One pass instead of two halves the number of kernel launches and, under DDP, keeps a single
    forward per backward (two forwards of a DDP module before one backward is an error).
    """
    n = len(pairs)
    prompts = [p.prompt for p in pairs]
    padded = collate_targets(prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    both = forward_logps(model, padded)
    return SeqLogps(both.sum[:n], both.count[:n]), SeqLogps(both.sum[n:], both.count[n:])


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Score without dropout or autograd; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def length_sorted_batches(sizes: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of `batch_size`, shortest items first, so batches waste little padding."""
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    step = max(1, batch_size)
    for start in range(0, len(order), step):
        yield order[start : start + step]


def score_targets(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 8,
    reduction: Reduction = "sum",
) -> Tensor:
    """log π(target | prompt) for each (prompt, target) pair, as a float32 CPU tensor of shape (n,).

    Stable API for evaluation (implicit-reward accuracy = compare
    ``score(policy) − score(reference)`` of chosen and rejected). Same tokenization as training.
    Pairs are scored in batches sorted by length to waste little padding; output order = input order.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pad = pad_id_of(tokenizer)
    encoded = [
        (prompt_token_ids(tokenizer, p), target_token_ids(tokenizer, t))
        for p, t in zip(prompts, targets, strict=True)
    ]
    with eval_mode(model):
        out = torch.zeros(len(encoded), dtype=torch.float32)
        for idx in length_sorted_batches([len(p) + len(t) for p, t in encoded], batch_size):
            batch = collate_targets([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], pad)
            out[idx] = forward_logps(model, batch).reduce(reduction).float().cpu()
    return out


def score_pairs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    batch_size: int = 8,
) -> tuple[Tensor, Tensor]:
    """log π(chosen | prompt) and log π(rejected | prompt) per pair (summed), as float32 CPU tensors.

    The same numbers as two `score_targets` calls, but both answers are scored against one pass over
    the prompt (`fspo.infer.prefix`, falling back to two rows where the model does not support it):
    FSPO prompts are ~10x the answers, so evaluation runs about twice as fast.
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected")
    pad = pad_id_of(tokenizer)
    side = getattr(tokenizer, "padding_side", "right")
    pairs = [
        PairTokens(
            prompt_token_ids(tokenizer, p), target_token_ids(tokenizer, c), target_token_ids(tokenizer, r)
        )
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ]
    with eval_mode(model):
        out_c = torch.zeros(len(pairs), dtype=torch.float32)
        out_r = torch.zeros(len(pairs), dtype=torch.float32)
        sizes = [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]
        for idx in length_sorted_batches(sizes, batch_size):
            chosen_lp, rejected_lp = pair_logps(model, [pairs[i] for i in idx], pad, side)
            out_c[idx] = chosen_lp.sum.float().cpu()
            out_r[idx] = rejected_lp.sum.float().cpu()
    return out_c, out_r
