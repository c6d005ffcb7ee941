"""Log-prob computation: separate tokenization, masked labels, and agreement with a manual forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fspo.infer.logps import (
    IGNORE,
    collate_targets,
    compute_pair_logps,
    prompt_token_ids,
    score_targets,
    sequence_logps,
    target_token_ids,
)
from fspo.infer.pairs import PairTokens
from fspo.models.loading import load_model, load_tokenizer


def test_labels_mask_prompt_and_padding() -> None:
    batch = collate_targets([[1, 5, 6], [1, 7]], [[8, 9, 2], [3, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 3, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE, IGNORE, IGNORE, 8, 9, 2],
        [IGNORE, IGNORE, 3, 2, IGNORE, IGNORE],
    ]


def test_sequence_logps_by_hand() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[IGNORE, 1, 2]])  # p(1 | pos0) = .25, p(2 | pos1) = .1
    out = sequence_logps(logits, labels)
    assert out.sum.item() == pytest.approx(float(torch.log(torch.tensor(0.25 * 0.1))), rel=1e-5)
    assert out.count.item() == 2
    assert out.reduce("mean").item() == pytest.approx(out.sum.item() / 2)


def test_prompt_and_target_tokenized_separately(tiny_llama_folder: Path) -> None:
    tok = load_tokenizer(tiny_llama_folder)
    p = prompt_token_ids(tok, "## Question \nWhich hat?\n")
    t = target_token_ids(tok, "## Response \nThe red hat.\n")
    assert p[0] == tok.bos_token_id and t[-1] == tok.eos_token_id
    assert tok.decode(t[:-1]) == "## Response \nThe red hat.\n"


def test_pair_logps_and_score_targets_agree_with_manual_forward(tiny_llama_folder: Path) -> None:
    tok = load_tokenizer(tiny_llama_folder)
    model = load_model(tiny_llama_folder).eval()
    prompts = ["## Question \nWhich hat should I get?\n", "## Question \nWhich car?\n"]
    chosen = ["## Response \nGet the red hat.\n", "## Response \nThe blue one.\n"]
    rejected = ["## Response \nGet the blue hat, surely.\n", "## Response \nGreen.\n"]
    pids = [prompt_token_ids(tok, p) for p in prompts]
    pairs = [
        PairTokens(p, target_token_ids(tok, c), target_token_ids(tok, r))
        for p, c, r in zip(pids, chosen, rejected, strict=True)
    ]
    with torch.no_grad():
        c, r = compute_pair_logps(model, pairs, tok.pad_token_id)
        # Manual: unpadded single-sequence forward, summing log p of the target tokens.
        for i in range(2):
            ids = pids[i] + pairs[i].chosen
            lp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
            manual = sum(lp[j - 1, ids[j]].item() for j in range(len(pids[i]), len(ids)))
            assert c.sum[i].item() == pytest.approx(manual, abs=1e-3)
            assert c.count[i].item() == len(pairs[i].chosen)
    scored = score_targets(model, tok, prompts + prompts, chosen + rejected, batch_size=3)
    assert scored.tolist() == pytest.approx(torch.cat([c.sum, r.sum]).tolist(), abs=1e-3)
    mean = score_targets(model, tok, prompts, chosen, reduction="mean")
    assert mean.tolist() == pytest.approx(c.mean.tolist(), abs=1e-4)
