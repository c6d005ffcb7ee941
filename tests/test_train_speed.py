"""Training-speed options in the trainer: K questions per context, the cached reference, bucketing.

Each option must change only how fast training runs, never what it computes: K questions per row
give the loss and gradients of one question per row on the same pairs; the cached reference gives
the losses of the per-step reference; a second run reuses the cache and computes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_dir, write_jsonl
from fspo.core.errors import UserError
from fspo.data.episodes import build_episodes
from fspo.data.tokens import pad_id_of
from fspo.testing import toy_corpus, toy_preferences, toy_users
from fspo.train import trainer as T
from fspo.train.config import make_config, recipe
from fspo.train.contexts import group_examples, load_contexts
from fspo.train.losses import sft_loss
from fspo.train.objective import preference_of
from fspo.train.refcache import reference_logps
from fspo.train.reference import reference_values
from fspo.train.scoring import looked_up, score_chosen, score_pairs
from fspo.train.tokenize import tokenize_episodes
from fspo.train.trainer import train

K = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Episodes built with 2 queries per shot set (so pairs of episodes share their shots)."""
    root = tmp_path_factory.mktemp("speed")
    users = toy_users(6)
    prefs = toy_preferences(users, per_user=12)
    splits = build_episodes(prefs, users, shots=2, test_user_fraction=0.34, seed=0, questions_per_context=K)
    (root / "eps").mkdir()
    return {
        "root": root,
        "train": write_jsonl(root / "eps" / "train.jsonl", splits["train"]),
        "test": write_jsonl(root / "eps" / "test_unseen.jsonl", splits["test_unseen"]),
        "llama": tiny_llama_dir(root / "llama", toy_corpus(splits["train"]) * 3),
    }


def _cfg(world: dict[str, Path], out: Path | None = None, **kw: object):
    values = {
        **recipe("fspo"),
        "model": str(world["llama"]),
        "episodes": str(world["train"]),
        "eval_episodes": str(world["test"]),
        "out": str(out or world["root"] / "unused"),
        "batch_size": 2,
        "max_steps": 3,
        "log_every": 1,
        "progress": False,
        "beta": 0.5,
        **kw,
    }
    return make_config(values)


def _variant(cfg, **kw: object):
    return make_config({**cfg.model_dump(), **kw})


def _records(out: Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    steps = [r for r in rows if "loss" in r and "event" not in r]
    return start, steps


def test_builder_gives_k_queries_per_shot_set(world: dict[str, Path]) -> None:
    users = toy_users(6)
    prefs = toy_preferences(users, per_user=12)
    one = build_episodes(prefs, users, shots=2, test_user_fraction=0.34, seed=0)
    two = build_episodes(prefs, users, shots=2, test_user_fraction=0.34, seed=0, questions_per_context=K)
    for split in ("train", "test_seen", "test_unseen"):
        ids = [e.episode_id for e in two[split]]
        assert len(ids) == len(set(ids)), split
    shots_of = [tuple(p.question for p in e.shots) for e in two["train"]]
    # siblings are adjacent: the file is a sequence of K-runs with one user and one shot set each
    for i in range(0, len(shots_of), K):
        run = two["train"][i : i + K]
        assert len({e.user_id for e in run}) == 1 and len(set(shots_of[i : i + K])) == 1
        assert len({e.query.question for e in run}) == K
        assert not {e.query.question for e in run} & set(shots_of[i])  # a query is never its own shot
    # with one query per shot set, a user's episodes within a pass never share shots
    first_pass = [e for e in one["train"] if e.metadata["pass"] == 0]
    per_user: dict[str, list] = {}
    for e in first_pass:
        per_user.setdefault(e.user_id, []).append(frozenset(p.question for p in e.shots))
    assert all(len(s) == len(set(s)) for s in per_user.values())
    seen_shots = [tuple(p.question for p in e.shots) for e in two["test_seen"]]
    assert len(set(seen_shots)) < len(seen_shots)  # held-out queries share a shot draw too
    with pytest.raises(UserError, match="questions_per_context"):
        build_episodes(prefs, users, shots=2, questions_per_context=0)


def test_grouping_keeps_each_pair_tokens_exactly(world: dict[str, Path]) -> None:
    """With the model's real BPE tokenizer, a grouped pair has exactly its one-question-per-row ids."""
    from fspo.data.episodes import load_episodes
    from fspo.data.template import TemplateOptions
    from fspo.models.loading import load_tokenizer

    tok = load_tokenizer(world["llama"])
    episodes = load_episodes(world["train"])
    alone, _ = tokenize_episodes(episodes, tok, TemplateOptions())
    split, _ = tokenize_episodes(episodes, tok, TemplateOptions(), split_shared=True)
    units = group_examples(split, K)
    assert sum(len(u.ids) == K for u in units) >= 0.9 * len(units)
    by_id = {e.episode_id: e for e in alone}
    for u in units:
        for eid, pair in zip(u.ids, u.pairs(), strict=True):
            e = by_id[eid].tokens
            assert (pair.prompt, pair.chosen, pair.rejected) == (e.prompt, e.chosen, e.rejected)
    assert sorted(i for u in units for i in u.ids) == sorted(by_id)


@pytest.mark.parametrize(("loss", "reduction"), [("ipo", "sum"), ("dpo", "mean")])
def test_k_questions_per_row_same_loss_and_grads_as_one(
    world: dict[str, Path], loss: str, reduction: str
) -> None:
    """The trainer's own step computation on the same 16 episodes, K=2 rows vs one question per row."""
    from fspo.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(world["llama"])
    pad = pad_id_of(tok)
    ref_model = load_model(world["llama"])
    policy = load_model(world["llama"])
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that is not the reference, so the loss has a gradient
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = {}
    for k in (1, K):
        cfg = _cfg(world, logps_impl="prefix", questions_per_context=k, loss=loss, reduction=reduction)
        units, _, _, _ = load_contexts(cfg, cfg.episodes, "train", tok, limit=16)
        ref, _ = reference_logps(ref_model, units, pad)
        policy.zero_grad()
        lp = score_pairs(cfg, policy, units, pad)
        out = preference_of(cfg, lp, looked_up(ref, units, lp))
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters()])
        sft_cfg = _variant(cfg, stage="sft")
        policy.zero_grad()
        chosen = score_chosen(sft_cfg, policy, units, pad)
        nll = sft_loss(chosen.sum, chosen.count)
        nll.backward()
        sft_grads = torch.cat([p.grad.flatten() for p in policy.parameters()])
        ids = [i for u in units for i in u.ids]
        got[k] = (len(units), sorted(ids), out.loss.detach(), grads, nll.detach(), sft_grads)
    assert got[K][0] <= 9 < got[1][0] == 16  # K=2 really shared rows: 16 pairs in at most 9 rows
    assert got[K][1] == got[1][1]
    assert got[1][2] > 1e-3
    for a, b in zip(got[K][2:], got[1][2:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # as tests/test_prefix.py


def test_k_needs_the_prefix_scorer() -> None:
    with pytest.raises(UserError, match="field 'questions_per_context'"):
        make_config({"model": "m", "episodes": "e", "questions_per_context": 2})
    assert make_config({"model": "m", "episodes": "e", "logps_impl": "prefix"}).bucketed
    assert not make_config({"model": "m", "episodes": "e"}).bucketed  # the default path is unchanged
    assert make_config({"model": "m", "episodes": "e", "group_by_length": True}).bucketed


def test_run_caches_reference_and_reuses_it(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(world, tmp_path / "a", logps_impl="prefix", questions_per_context=K)
    train(cfg)
    start, steps = _records(tmp_path / "a")
    assert start["questions_per_context"] > 1.8 and start["group_by_length"] and start["shared_rows"]
    ref = start["reference"]
    assert ref["train"]["computed"] == start["train_examples"] and ref["train"]["reused"] == 0
    assert ref["eval"]["computed"] > 0
    assert [Path(ref[s]["cache"]).parent for s in ("train", "eval")] == [world["train"].parent] * 2
    assert len(steps) == 3 and all(0 <= r["padding_fraction"] < 1 and r["pairs_per_s"] > 0 for r in steps)

    train(_variant(cfg, out=str(tmp_path / "b")))  # same data and reference: all reused
    start_b, steps_b = _records(tmp_path / "b")
    assert start_b["reference"]["train"] | {"seconds": 0} == {
        "cache": ref["train"]["cache"],
        "computed": 0,
        "reused": start["train_examples"],
        "seconds": 0,
    }
    assert start_b["reference"]["eval"]["computed"] == 0
    assert [r["loss"] for r in steps_b] == [r["loss"] for r in steps]  # the cached values are exact

    # LoRA's reference is the same starting model (adapters disabled): the same cache serves it
    train(_variant(cfg, out=str(tmp_path / "c"), lora={"r": 4, "target_modules": ["q_proj"]}))
    assert _records(tmp_path / "c")[0]["reference"]["train"]["computed"] == 0

    # another template option is another reference: a second sidecar, computed afresh
    train(_variant(cfg, out=str(tmp_path / "d"), include_dispreferred=False))
    start_d, _ = _records(tmp_path / "d")
    assert start_d["reference"]["train"]["computed"] == start["train_examples"]
    assert start_d["reference"]["train"]["cache"] != ref["train"]["cache"]
    assert len(list(world["train"].parent.glob("train.jsonl.reflogps-*.json"))) == 2


def test_cached_reference_trains_like_the_per_step_reference(world: dict[str, Path], tmp_path: Path) -> None:
    """Default path (concat, one question per row): caching the reference changes no number."""
    runs = {}
    for cache in (False, True):
        out = tmp_path / f"cache-{cache}"
        train(_cfg(world, out, reference_cache=cache, max_steps=4, lr=1e-3))
        runs[cache] = _records(out)
    assert "train" not in runs[False][0]["reference"] and "train" in runs[True][0]["reference"]
    assert not runs[True][0]["group_by_length"]
    for a, b in zip(runs[False][1], runs[True][1], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["margin"] == pytest.approx(a["margin"], rel=1e-3, abs=1e-4)
    assert runs[True][1][-1]["loss"] != runs[True][1][0]["loss"]  # training moved


def test_lora_reference_is_the_base_model(world: dict[str, Path]) -> None:
    """With adapters that change the outputs, the reference still scores the starting model."""
    from accelerate import Accelerator

    from fspo.models.loading import load_model

    cfg = _cfg(world, logps_impl="prefix", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    model, tok = T._setup_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    units, _, file, _ = load_contexts(cfg, cfg.episodes, "train", tok, limit=8)
    pad = pad_id_of(tok)
    acc = Accelerator(cpu=True)
    lora_ref, _ = reference_values(cfg, acc, model, units, file, pad, model_fp=None)
    base_ref, _ = reference_logps(load_model(world["llama"]), units, pad)
    adapted, _ = reference_logps(model, units, pad)
    for eid, value in base_ref.items():
        assert lora_ref[eid] == pytest.approx(value, abs=1e-4)
    assert max(abs(adapted[e][0] - base_ref[e][0]) for e in base_ref) > 1e-2
