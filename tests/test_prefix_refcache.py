"""Reference log-probs: computed once, reused, recomputed only for changed data, model or options."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from fspo.core.errors import UserError
from fspo.infer.pairs import ContextTokens, PairTokens, QuestionTokens
from fspo.infer.prefix import plain_pair_logps
from fspo.models.tiny import tiny_llama
from fspo.train import refcache
from fspo.train.refcache import (
    ReferenceCache,
    cached_reference_logps,
    compute_reference_logps,
    model_fingerprint,
    sidecar_path,
)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    size = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2}
    return tiny_llama(50, **size, **heads, initializer_range=0.2)


def items(seed: int = 0, n: int = 6) -> list[tuple[str, PairTokens]]:
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, 50) for _ in range(rng.randint(lo, hi))]

    return [(f"ep{i}", PairTokens(ids(3, 12), ids(1, 5), ids(1, 5))) for i in range(n)]


def test_compute_matches_plain_and_restores_train_mode(model):
    model.train()
    data = items()
    got = compute_reference_logps(model, [data[:4], data[4:]], pad_id=0)
    assert model.training
    model.eval()
    with torch.no_grad():
        chosen, rejected = plain_pair_logps(model, [p for _, p in data], 0)
    for i, (eid, _) in enumerate(data):
        assert got[eid] == pytest.approx((chosen.sum[i].item(), rejected.sum[i].item()), abs=1e-4)


def test_context_items_take_one_id_per_question(model):
    ctx = ContextTokens([1, 2, 3], [QuestionTokens([4], [5, 6], [7]), QuestionTokens([8, 9], [10], [11, 12])])
    got = compute_reference_logps(model, [[(["a", "b"], ctx)]], pad_id=0)
    plain = compute_reference_logps(model, [[("a", ctx.pairs()[0]), ("b", ctx.pairs()[1])]], pad_id=0)
    assert got.keys() == {"a", "b"}
    for k in got:
        assert got[k] == pytest.approx(plain[k], abs=1e-4)


def count_computed(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = refcache.compute_reference_logps

    def spy(model, batches, pad_id, shared=True):
        batches = list(batches)
        seen.append(sum(len(b) for b in batches))
        return real(model, batches, pad_id, shared=shared)

    monkeypatch.setattr(refcache, "compute_reference_logps", spy)
    return seen


def test_cache_reuse_and_invalidation(model, tmp_path, monkeypatch):
    seen = count_computed(monkeypatch)
    path = sidecar_path(tmp_path / "episodes.jsonl", "fp1", {"shots": 4})
    assert path.parent == tmp_path and path.name.startswith("episodes.jsonl.reflogps-")
    assert sidecar_path(tmp_path / "episodes.jsonl", "fp1", {"shots": 4}) == path
    assert sidecar_path(tmp_path / "episodes.jsonl", "fp2", {"shots": 4}) != path  # one file per reference
    assert sidecar_path(tmp_path / "episodes.jsonl", "fp1", {"shots": 8}) != path
    data = items()
    first = cached_reference_logps(model, data, ReferenceCache(path, "fp1", {"shots": 4}), pad_id=0)
    assert seen == [6] and path.exists()

    again = cached_reference_logps(model, data, ReferenceCache(path, "fp1", {"shots": 4}), pad_id=0)
    assert seen == [6] and again == first  # nothing recomputed

    changed = list(data)
    eid, p = changed[2]
    changed[2] = (eid, PairTokens(p.prompt, [*p.chosen, 7], p.rejected))  # data change: one episode
    cached_reference_logps(model, changed, ReferenceCache(path, "fp1", {"shots": 4}), pad_id=0)
    assert seen == [6, 1]

    cached_reference_logps(model, changed, ReferenceCache(path, "fp2", {"shots": 4}), pad_id=0)
    assert seen == [6, 1, 6]  # model change: all
    cached_reference_logps(model, changed, ReferenceCache(path, "fp2", {"shots": 8}), pad_id=0)
    assert seen == [6, 1, 6, 6]  # template options change: all


def test_model_fingerprint_follows_weights(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    fp = model_fingerprint(tmp_path / "m")
    assert fp == model_fingerprint(tmp_path / "m")
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        model.model.norm.weight.sub_(1.0)
    assert model_fingerprint(tmp_path / "m") != fp
    with pytest.raises(UserError):
        model_fingerprint(tmp_path / "missing")


def test_corrupt_cache_is_a_user_error(tmp_path):
    bad = tmp_path / "x.reflogps.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="delete it"):
        ReferenceCache(bad, "fp")


def test_save_keeps_entries_another_run_saved(model, tmp_path):
    path = sidecar_path(tmp_path / "episodes.jsonl", "fp", None)
    data = items(n=6)
    a, b = ReferenceCache(path, "fp"), ReferenceCache(path, "fp")  # both read the (absent) file
    cached_reference_logps(model, data[:3], a, pad_id=0)
    cached_reference_logps(model, data[3:], b, pad_id=0)  # saved last, without a's entries in memory
    assert len(ReferenceCache(path, "fp")) == 6
