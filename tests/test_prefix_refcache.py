"""Reference log-probs: computed once, reused, recomputed only for changed data, model or options."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaForCausalLM

from fspo.core.errors import UserError
from fspo.infer.pairs import ContextTokens, PairTokens, QuestionTokens
from fspo.infer.prefix import plain_pair_logps
from fspo.testing import tiny_llama
from fspo.train import refcache
from fspo.train.refcache import (
    ReferenceCache,
    cached_reference_logps,
    compute_reference_logps,
    model_fingerprint,
    reference_batches,
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

    def run(data, fp="fp1", options=None):
        cache = ReferenceCache(path, fp, options or {"shots": 4})
        return cached_reference_logps(model, data, cache, pad_id=0, batch_size=2)

    first = run(data)
    assert seen == [6] and path.exists()
    again = run(data)
    assert seen == [6] and again == first  # nothing recomputed

    changed = list(data)
    eid, p = changed[2]
    swapped = [p.chosen[0] % 49 + 1, *p.chosen[1:]]  # same length: the batches stay the same
    changed[2] = (eid, PairTokens(p.prompt, swapped, p.rejected))  # data change: one episode
    run(changed)
    assert seen == [6, 2]  # its batch of 2, computed whole
    assert run(changed) != first

    run(changed, fp="fp2")
    assert seen == [6, 2, 6]  # model change: all
    run(changed, fp="fp2", options={"shots": 8})
    assert seen == [6, 2, 6, 6]  # template options change: all


def long_items(n: int, seed: int = 1) -> list[tuple[str, PairTokens]]:
    """Pairs of very different lengths, so a batch's padding (and its floats) depends on its members."""
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, 50) for _ in range(rng.randint(lo, hi))]

    return [(f"ep{i}", PairTokens(ids(20, 300), ids(2, 30), ids(2, 30))) for i in range(n)]


def as_tensor(values: dict[str, tuple[float, float]]) -> torch.Tensor:
    return torch.tensor([values[k] for k in sorted(values)], dtype=torch.float64)


def test_values_do_not_depend_on_what_an_earlier_run_cached(tmp_path):
    """Issue 19: a cache filled partly by an earlier run gave other floats than one filled in one go."""
    model = tiny_llama(50, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, initializer_range=0.2)  # fmt: skip
    data = long_items(24)
    one_go = cached_reference_logps(model, data, ReferenceCache(tmp_path / "one.json", "fp"), 0, batch_size=4)
    earlier_runs = {"prefix": data[:10], "every third": data[::3], "two": data[5:7], "all": data}
    # The premise: an episode scored in the batches of a subset gets other floats (the old cache
    # batched only what it lacked). Without it this test could not fail.
    drift = [k for sub in earlier_runs.values()
             for k, v in compute_reference_logps(model, reference_batches(sub, 4), pad_id=0).items()
             if v != one_go[k]]  # fmt: skip
    assert drift

    for name, subset in earlier_runs.items():
        path = tmp_path / f"{name}.json"
        for batch_size in (3, 4):  # an earlier run with another batch size, then one with this one
            cached_reference_logps(model, subset, ReferenceCache(path, "fp"), 0, batch_size=batch_size)
        got = cached_reference_logps(model, data, ReferenceCache(path, "fp"), 0, batch_size=4)
        assert torch.equal(as_tensor(got), as_tensor(one_go)), name
        stored, missing = ReferenceCache(path, "fp").lookup(reference_batches(data, 4))
        assert not missing and torch.equal(as_tensor(stored), as_tensor(one_go)), name


def test_training_weights_do_not_depend_on_a_partial_cache(tmp_path):
    """An FSPO run over a reference cache that an earlier run filled in part (a shorter run: a prefix
    of the file, in batches of another size) ends with the same weights, bit for bit, as a run over a
    cache it fills itself."""
    from safetensors.torch import load_file

    from conftest import train_world, write_jsonl
    from fspo.testing import toy_episodes, toy_users
    from fspo.train.config import make_config, recipe
    from fspo.train.tokenize import limit_shots
    from fspo.train.trainer import train

    rng = random.Random(0)  # 0 to 5 shots: episodes of very different lengths
    eps = [limit_shots(e, rng.randint(0, 5)) for e in toy_episodes(toy_users(8), per_user=4, shots=5)]
    world = train_world(tmp_path, eps)

    def run(folder: str, batch_size: int, max_steps: int) -> dict[str, torch.Tensor]:
        (tmp_path / folder).mkdir(exist_ok=True)
        episodes = write_jsonl(tmp_path / folder / "train.jsonl", eps)  # a sidecar of its own
        cfg = {**recipe("fspo"), "model": str(world["llama"]), "episodes": str(episodes), "lr": 1e-3,
               "batch_size": batch_size, "max_steps": max_steps, "progress": False, "seed": 1,
               "out": str(tmp_path / folder / f"out{max_steps}")}  # fmt: skip
        r = train(make_config(cfg))
        return load_file(r.model_dir / "model.safetensors")

    one_go = run("one-go", 4, 8)  # one epoch: every episode's reference value is used
    run("partial", 3, 1)  # reads (and caches) only the first 12 episodes, in batches of 3
    partial = run("partial", 4, 8)
    start = load_file(world["llama"] / "model.safetensors")
    assert max((one_go[k] - start[k]).abs().max().item() for k in start) > 1e-4  # it trained
    assert all(torch.equal(one_go[k], partial[k]) for k in one_go)
    a, b = (json.loads(next((tmp_path / f).glob("train.jsonl.reflogps-*")).read_text())["entries"]
            for f in ("one-go", "partial"))  # fmt: skip
    assert a.keys() == b.keys()
    assert all((a[k]["chosen"], a[k]["rejected"]) == (b[k]["chosen"], b[k]["rejected"]) for k in a)


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
