"""Tokenizing episodes into shared contexts, and length-bucketed batches with less padding."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import shared_shot_episodes
from fspo.core.errors import UserError
from fspo.data.schema import Episode
from fspo.infer.pairs import ContextTokens
from fspo.train.buckets import bucketed_batches, epoch_batches, padding_fraction
from fspo.train.contexts import tokenize_contexts, tokenize_pair


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: splitting text anywhere never changes its tokens."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def episodes() -> list[Episode]:
    return shared_shot_episodes(shots=3, queries=5)


def test_k1_is_plain_tokenization(tokenizer):
    from fspo.data.template import render

    eps = episodes()
    got = tokenize_contexts(tokenizer, eps, k=1)
    assert [ids for ids, _ in got] == [[e.episode_id] for e in eps]
    r = render(eps[0])
    assert got[0][1].pairs()[0] == tokenize_pair(tokenizer, r.prompt, r.chosen, r.rejected)


def test_k_groups_same_shots_and_matches_plain_pairs(tokenizer):
    from fspo.data.template import QUESTION, render

    eps = episodes()
    got = tokenize_contexts(tokenizer, eps, k=2)
    ids = [i for group, _ in got for i in group]
    assert sorted(ids) == sorted(e.episode_id for e in eps)
    by_id = {e.episode_id: e for e in eps}
    for group, ctx in got:
        assert len({by_id[i].user_id for i in group}) == 1 and 1 <= len(group) <= 2
        assert ctx.shared[0] == tokenizer.bos_token_id
        heading = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
        if len(group) > 1:  # split at the query's question block
            assert all(q.question[: len(heading)] == heading for q in ctx.items)
        else:  # a context of one is exactly the one-question row
            assert ctx == ContextTokens.of(ctx.pairs()[0])
        for eid, pair in zip(group, ctx.pairs(), strict=True):
            r = render(by_id[eid])
            assert pair == tokenize_pair(tokenizer, r.prompt, r.chosen, r.rejected)
    assert len(got) == 6  # 5 episodes per user -> 2 + 2 + 1, per user


def test_k_must_be_positive(tokenizer):
    with pytest.raises(UserError):
        tokenize_contexts(tokenizer, episodes(), k=0)


def test_bucketing_covers_everything_once_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(200, 1200) for _ in range(1000)]
    naive = [list(range(i, i + 8)) for i in range(0, 1000, 8)]
    batches = bucketed_batches(lengths, 8, mega_batches=16, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) <= 8 for b in batches)
    before, after = padding_fraction(lengths, naive), padding_fraction(lengths, batches)
    assert before > 0.25 and after < 0.05, (before, after)


def test_bucketing_is_deterministic_per_seed():
    lengths = list(range(100))
    assert bucketed_batches(lengths, 4, seed=3) == bucketed_batches(lengths, 4, seed=3)
    assert bucketed_batches(lengths, 4, seed=3) != bucketed_batches(lengths, 4, seed=4)


def test_epoch_batches_are_a_function_of_seed_and_epoch_split_across_processes():
    rng = random.Random(1)
    lengths = [rng.randint(50, 900) for _ in range(203)]
    one = epoch_batches(lengths, 4, epoch=2, seed=7)
    assert one == epoch_batches(lengths, 4, epoch=2, seed=7)  # what --resume relies on
    assert one != epoch_batches(lengths, 4, epoch=3, seed=7)
    assert len(one) == 203 // 4 and all(len(b) == 4 for b in one)  # incomplete batches dropped
    assert len({i for b in one for i in b}) == 4 * len(one)
    ranks = [epoch_batches(lengths, 2, epoch=2, seed=7, rank=r, world=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 203 // 4
    # the two processes' batches together are the one-process run's global batches
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(b) for b in one]
    naive = [list(range(i, i + 4)) for i in range(0, 200, 4)]
    assert padding_fraction(lengths, one) < padding_fraction(lengths, naive) / 3
