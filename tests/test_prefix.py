"""Prefix-shared log-probs equal the plain two-sequence path: values, gradients, K questions, fallback."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from fspo.infer import prefix
from fspo.infer.pairs import ContextTokens, PairTokens, QuestionTokens
from fspo.infer.prefix import (
    build_shared_rows,
    pair_logps,
    plain_pair_logps,
    shared_attention_mask,
    shared_pair_logps,
)
from fspo.testing import tiny_gpt2, tiny_llama

VOCAB = 97
PAD = 0


TINY = {
    "llama": lambda attn: tiny_llama(VOCAB, attn=attn, initializer_range=0.2),
    "gpt2": lambda attn: tiny_gpt2(
        VOCAB, attn=attn, n_head=4, n_positions=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2
    ),
}


def tiny(kind: str, attn: str = "sdpa") -> torch.nn.Module:
    return TINY[kind](attn).eval()  # no dropout: the two paths must see the same network


def rand_ids(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]


def rand_pairs(seed: int, n: int = 4) -> list[PairTokens]:
    rng = random.Random(seed)
    return [PairTokens(rand_ids(rng, 1, 30), rand_ids(rng, 1, 9), rand_ids(rng, 1, 9)) for _ in range(n)]


def rand_contexts(seed: int, n: int = 3, k: int = 3) -> list[ContextTokens]:
    rng = random.Random(seed)
    return [
        ContextTokens(
            rand_ids(rng, 1, 25),
            [
                QuestionTokens(rand_ids(rng, 0, 6), rand_ids(rng, 1, 8), rand_ids(rng, 1, 8))
                for _ in range(rng.randint(1, k))
            ],
        )
        for _ in range(n)
    ]


def grads_of(
    model: torch.nn.Module, fn, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    chosen, rejected = fn()
    values = torch.stack([chosen.sum, rejected.sum], 1)
    (values * weights).sum().backward()
    return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, plain_fn, shared_fn, n_pairs: int) -> None:
    weights = torch.randn(n_pairs, 2, generator=torch.Generator().manual_seed(1))
    v1, g1 = grads_of(model, plain_fn, weights)
    v2, g2 = grads_of(model, shared_fn, weights)
    torch.testing.assert_close(v2, v1, atol=1e-4, rtol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_equals_plain_values_and_grads(kind, attn, side, seed):
    model = tiny(kind, attn)
    pairs = rand_pairs(seed)
    assert_same(
        model,
        lambda: plain_pair_logps(model, pairs, PAD, side),
        lambda: shared_pair_logps(model, pairs, PAD, side),
        len(pairs),
    )


def test_plain_equals_unpadded_single_sequences():
    """The reference itself: padding and explicit position ids change nothing."""
    model = tiny("gpt2")
    pairs = rand_pairs(3)
    chosen, rejected = plain_pair_logps(model, pairs, PAD, "left")
    for i, p in enumerate(pairs):
        for target, value in ((p.chosen, chosen.sum[i]), (p.rejected, rejected.sum[i])):
            ids = torch.tensor([[*p.prompt, *target]])
            logp = model(ids).logits.log_softmax(-1)[0]
            n = len(p.prompt)
            expected = sum(logp[n - 1 + j, t] for j, t in enumerate(target))
            torch.testing.assert_close(value, expected, atol=1e-4, rtol=1e-5)
    assert chosen.count.tolist() == [len(p.chosen) for p in pairs]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_k_questions_per_context_equal_plain(kind, side, seed):
    model = tiny(kind)
    contexts = rand_contexts(seed)
    pairs = [p for c in contexts for p in c.pairs()]
    assert len(pairs) > len(contexts)
    assert_same(
        model,
        lambda: plain_pair_logps(model, pairs, PAD, side),
        lambda: shared_pair_logps(model, contexts, PAD, side),
        len(pairs),
    )


def ipo_loss(policy, ref, beta: float = 0.1) -> torch.Tensor:
    h = (policy[0].sum - ref[0].sum) - (policy[1].sum - ref[1].sum)
    return ((h - 1 / (2 * beta)) ** 2).mean()


def test_k_questions_empty_question_segment_anchors_on_shared():
    rows = build_shared_rows(
        [ContextTokens([5, 6], [QuestionTokens([], [7], [8]), QuestionTokens([], [9], [10])])], PAD
    )
    assert rows.pred_index[0].tolist() == [1, 1, 1, 1]


def test_k_questions_loss_and_grads_equal_plain():
    model = tiny("llama")
    ref_model = tiny("llama")
    for p in ref_model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    contexts = rand_contexts(9, n=4, k=4)
    pairs = [p for c in contexts for p in c.pairs()]
    with torch.no_grad():
        ref = plain_pair_logps(ref_model, pairs, PAD)
    losses, grads = [], []
    for fn in (lambda: plain_pair_logps(model, pairs, PAD), lambda: shared_pair_logps(model, contexts, PAD)):
        model.zero_grad()
        loss = ipo_loss(fn(), ref)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_mask_blocks_and_positions():
    ctx = ContextTokens([5, 6], [QuestionTokens([7], [8, 9], [10]), QuestionTokens([11, 12], [13], [14, 15])])
    rows = build_shared_rows([ctx], PAD)
    m = shared_attention_mask(rows)[0, 0]
    # layout: s s | q1 | c1 c1 | r1 | q2 q2 | c2 | r2 r2
    assert rows.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 2, 3, 4, 4, 5]
    assert m[5].tolist() == [True, True, True, False, False, True, False, False, False, False, False]
    assert not m[6:, 2:6].any()  # nothing of question 2 sees question 1
    assert m[9, :2].all() and m[9, 6:8].all() and not m[9, 8]  # r2 sees shots, q2, not c2
    # first rejected token of each question is predicted from that question's last token
    assert rows.pred_index[0].tolist() == [2, 3, 2, 7, 7, 9]
    assert rows.targets[0].tolist() == [8, 9, 10, 13, 14, 15]


def test_padding_rows_never_fully_masked():
    rows = build_shared_rows(rand_pairs(2), PAD, "left")
    assert shared_attention_mask(rows).any(-1).all()


def test_fallback_for_unsupported_model_logs_once(caplog):
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    ok, reason = prefix.prefix_sharing_support(model)
    assert not ok and "gpt_neox" in reason
    prefix._warned.clear()
    pairs = rand_pairs(4)
    with caplog.at_level(logging.WARNING, logger="fspo.infer.prefix"):
        got = pair_logps(model, [ContextTokens.of(p) for p in pairs], PAD)
        pair_logps(model, pairs, PAD)
    warnings = [r for r in caplog.records if "prefix sharing off" in r.getMessage()]
    assert len(warnings) == 1 and "gpt_neox" in warnings[0].getMessage()
    torch.testing.assert_close(got[0].sum, plain_pair_logps(model, pairs, PAD)[0].sum)


def test_fallback_for_attention_without_custom_masks():
    model = tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    ok, reason = prefix.prefix_sharing_support(model)
    assert not ok and "flash_attention_2" in reason


def test_supported_model_uses_shared_path(monkeypatch):
    model = tiny("llama")
    called = []
    real = prefix.shared_pair_logps
    monkeypatch.setattr(prefix, "shared_pair_logps", lambda *a, **k: called.append(1) or real(*a, **k))
    pair_logps(model, rand_pairs(0), PAD)
    assert called
