"""Tokenizing episodes into shared contexts, and length-bucketed batches with less padding."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fspo.data.schema import Episode, Preference
from fspo.errors import UserError
from fspo.train.prefix import bucketed_batches, padding_fraction, tokenize_contexts, tokenize_pair


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


def pref(user: str, i: int) -> Preference:
    return Preference(user_id=user, question=f"question {i}?", chosen=f"good answer {i}", rejected=f"bad {i}")


def episodes() -> list[Episode]:
    out = []
    for user in ("u1", "u2"):
        shots = [pref(user, i) for i in range(3)]
        for q in range(3, 8):
            out.append(Episode(episode_id=f"{user}-{q}", user_id=user, shots=shots, query=pref(user, q)))
    return out


def test_k1_is_plain_tokenization(tokenizer):
    from fspo.data.template import render

    eps = episodes()
    got = tokenize_contexts(tokenizer, eps, k=1)
    assert [ids for ids, _ in got] == [[e.episode_id] for e in eps]
    r = render(eps[0])
    assert got[0][1].pairs()[0] == tokenize_pair(tokenizer, r.prompt, r.chosen, r.rejected)


def test_k_groups_same_shots_and_matches_plain_pairs(tokenizer):
    from fspo.data.template import render

    eps = episodes()
    got = tokenize_contexts(tokenizer, eps, k=2)
    ids = [i for group, _ in got for i in group]
    assert sorted(ids) == sorted(e.episode_id for e in eps)
    by_id = {e.episode_id: e for e in eps}
    for group, ctx in got:
        assert len({by_id[i].user_id for i in group}) == 1 and 1 <= len(group) <= 2
        assert ctx.shared[0] == tokenizer.bos_token_id
        assert all(q.question[0] != tokenizer.bos_token_id for q in ctx.items)
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
