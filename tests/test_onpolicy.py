"""On-policy FSPO (`fspo.train.onpolicy`): rounds of sampling the policy's own answers for training
users, pairing the best and worst by the exact reward, and training IPO on the pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import run_typer
from fspo.core.errors import UserError
from fspo.data.episodes import build_episodes, load_episodes, write_episodes
from fspo.data.io import read_records, write_records
from fspo.data.schema import Episode, User
from fspo.sim import reward_for, simulate
from fspo.testing import serve_openai, toy_corpus, user_text
from fspo.train import onpolicy as op
from fspo.train.labellers import PairwiseLabeller, SynthJudge

SMALL = {
    "rounds": 1,
    "episodes_per_round": 6,
    "samples": 4,
    "max_new_tokens": 32,
    "batch_size": 3,
    "train": {"max_steps": 2, "batch_size": 2, "progress": False},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Simulated Reviews users (some held out as unseen), their episodes, and a tiny model on their text."""
    from fspo.models.default import init_model

    root = tmp_path_factory.mktemp("onpolicy")
    data = simulate("reviews", n_users=16, prefs_per_user=8, seed=5, pairing="minimal", test_fraction=0.3)
    splits = build_episodes(data.preferences, data.users, shots=2, seed=0)
    assert splits["test_unseen"], "the world needs unseen users to show they are never sampled"
    write_episodes(root / "episodes", splits)
    write_records(root / "users.jsonl", data.users)
    model = init_model(root / "model", toy_corpus(splits["train"]) * 3, size="tiny", seed=0)
    return {"root": root, "episodes": root / "episodes", "users": root / "users.jsonl", "model": model}


def _config(world: dict[str, Path], out: Path, **values) -> op.OnPolicyConfig:
    base = {"model": str(world["model"]), "episodes": str(world["episodes"]), "users": str(world["users"])}
    return op.onpolicy_config({**base, **SMALL, "out": str(out), **values})


@pytest.fixture(scope="module")
def finished(world: dict[str, Path]) -> tuple[op.OnPolicyConfig, dict]:
    """One uninterrupted round."""
    cfg = _config(world, world["root"] / "run")
    return cfg, op.run_onpolicy(cfg)


def _samples(out: Path, r: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"round-{r}" / op.SAMPLES_FILE).read_text().splitlines()]


def test_one_round_pairs_the_best_and_worst_by_the_exact_reward(world, finished):
    cfg, summary = finished
    out = Path(cfg.out)
    users = {u.user_id: u for u in read_records(world["users"], User)}
    rec = summary["rounds"][0]
    samples = _samples(out)[1:]
    assert rec["episodes"] == len(samples) == 6 and rec["samples"] == 6 * 4
    assert rec["pairs"] > 0 and rec["pairs"] + rec["ties"] == rec["episodes"]

    # Every sample's score is its user's exact reward, and the pair is the best and the worst of them.
    by_episode = {s["episode_id"]: s for s in samples}
    for s in samples:
        r = reward_for(users[s["user_id"]])
        assert s["scores"] == [r(s["question"], a) if a.strip() else None for a in s["answers"]]
    pairs = read_records(out / "round-0" / op.PAIRS_FILE, Episode)
    assert len(pairs) == rec["pairs"]
    for pair in pairs:
        r = reward_for(users[pair.user_id])
        chosen, rejected = (
            r(pair.query.question, pair.query.chosen),
            r(pair.query.question, pair.query.rejected),
        )
        assert chosen > rejected
        scores = [x for x in by_episode[pair.episode_id.removesuffix("@r0")]["scores"] if x is not None]
        assert (chosen, rejected) == (max(scores), min(scores))

    # Only training users' episodes are sampled; no unseen user ever labels.
    train = {e.episode_id: e for e in load_episodes(world["episodes"], "train")}
    unseen = {e.user_id for e in load_episodes(world["episodes"], "test_unseen")}
    assert all(s["episode_id"] in train and s["user_id"] not in unseen for s in samples)
    for pair in pairs:  # a pair keeps its episode's user and shots
        source = train[pair.episode_id.removesuffix("@r0")]
        assert (pair.user_id, pair.shots) == (source.user_id, source.shots)

    # The statistics are those of the samples.
    answers = [a for s in samples for a in s["answers"]]
    scores = [x for s in samples for x in s["scores"] if x is not None]
    assert rec["mean_reward"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    assert rec["mean_words"] == pytest.approx(sum(len(a.split()) for a in answers) / len(answers), abs=1e-3)
    assert 0 <= rec["degenerate_share"] <= 1 and 0 <= rec["trait_share"] <= 1
    assert rec["relevance"] is not None and rec["examples"]

    # The round trained IPO from the policy that sampled (its own reference); the final model is placed.
    trained = json.loads((out / "round-0" / "train" / "fspo_config.json").read_text())
    assert (trained["stage"], trained["model"], trained["max_steps"]) == ("fspo", str(world["model"]), 2)
    assert trained["episodes"] == str(out / "round-0" / op.PAIRS_FILE)
    assert (out / "model" / "config.json").is_file() and summary["model"] == str(out / "model")
    assert json.loads((out / op.SUMMARY_FILE).read_text()) == summary


def test_a_killed_run_resumes_byte_identical_then_skips_finished_rounds(
    world, finished, tmp_path, monkeypatch
):
    ref_cfg, ref = finished
    cfg = _config(world, tmp_path / "run")
    real = op.generate_batch
    calls = {"n": 0}

    def killed_after_one_batch(*args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "generate_batch", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        op.run_onpolicy(cfg)
    log = tmp_path / "run" / "round-0" / op.SAMPLES_FILE
    assert len(log.read_text().splitlines()) == 1 + 3  # the settings and the first batch's episodes
    with log.open("a") as f:
        f.write('{"episode_id": "torn')  # a kill in the middle of a line
    monkeypatch.setattr(op, "generate_batch", real)
    summary = op.run_onpolicy(cfg)

    ref_out = Path(ref_cfg.out)
    for name in (op.SAMPLES_FILE, op.PAIRS_FILE):
        assert (tmp_path / "run" / "round-0" / name).read_bytes() == (ref_out / "round-0" / name).read_bytes()
    labels = ("pairs", "ties", "mean_reward", "mean_words", "degenerate_share", "trait_share", "examples")
    assert {k: summary["rounds"][0][k] for k in labels} == {k: ref["rounds"][0][k] for k in labels}

    # A rerun finds the round finished: nothing is sampled or trained again.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished round ran again")

    monkeypatch.setattr(op, "generate_batch", refuse)
    monkeypatch.setattr("fspo.train.trainer.train", refuse)
    assert op.run_onpolicy(cfg) == summary


def test_more_rounds_extend_a_run_each_from_the_last_policy(world, finished, tmp_path):
    import shutil

    ref_cfg, _ = finished
    shutil.copytree(ref_cfg.out, tmp_path / "run")
    cfg = _config(world, tmp_path / "run", rounds=2)
    summary = op.run_onpolicy(cfg)
    first, second = summary["rounds"]
    assert second["start_model"] == first["model"] == str(tmp_path / "run" / "round-0" / "train" / "model")
    trained = json.loads((tmp_path / "run" / "round-1" / "train" / "fspo_config.json").read_text())
    assert trained["model"] == first["model"]  # round 1's reference is the policy that sampled it
    assert _samples(tmp_path / "run", 1)[0]["settings"]["round"] == 1
    # Round 1 samples the next training episodes of the seeded order, not round 0's again.
    assert not {s["episode_id"] for s in _samples(tmp_path / "run", 1)[1:]} & {
        s["episode_id"] for s in _samples(tmp_path / "run", 0)[1:]
    }
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.parametrize(
    "values, field",
    [
        ({"samples": 1}, "samples"),
        ({"rounds": 0}, "rounds"),
        ({"decoding": {"temperature": 0.0}}, "decoding"),
        ({"decoding": {"top_p": 2.0}}, "decoding.top_p"),
        ({"judge": "gpt"}, "judge"),
        ({"train": {"model": "elsewhere"}}, "train"),
        ({"train": {"rat": "target"}}, "train"),
        ({"train": {"beta": -1.0}}, "beta"),
        ({"train": {"no_such_field": 1}}, "no_such_field"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_options_name_the_field(world, tmp_path, values, field):
    with pytest.raises(UserError, match=f"field '{field}"):
        _config(world, tmp_path / "run", **values)


def test_cli_names_the_bad_flag_and_takes_train_flags(world, tmp_path):
    from fspo.train.cli import app

    base = ["onpolicy", "--model", world["model"], "--episodes", world["episodes"], "--users", world["users"]]
    code, message = run_typer(app, *base, "--out", tmp_path / "a", "--samples", "1")
    assert code == 2 and "field 'samples'" in message
    code, message = run_typer(app, *base, "--out", tmp_path / "b", "--train-beta", "-1")
    assert code == 2 and "field 'beta'" in message
    code, message = run_typer(app, *base, "--out", tmp_path / "c", "--decoding-temperature", "0")
    assert code == 2 and "field 'decoding'" in message
    assert not (tmp_path / "a").exists()


def test_unseen_users_are_refused(world, tmp_path):
    users = op.read_users(world["users"])
    unseen = load_episodes(world["episodes"], "test_unseen")
    write_records(tmp_path / "mixed.jsonl", [*load_episodes(world["episodes"], "train")[:3], unseen[0]])
    with pytest.raises(UserError, match="split 'test_unseen', not train"):
        op.training_episodes(tmp_path / "mixed.jsonl", users)
    # A folder whose training split holds a test_unseen user (relabelled as train) is refused too.
    smuggled = unseen[0].model_copy(update={"split": "train"})
    splits = {"train": [*load_episodes(world["episodes"], "train")[:3], smuggled], "test_unseen": unseen}
    write_episodes(tmp_path / "folder", splits)
    with pytest.raises(UserError, match="test_unseen user"):
        op.training_episodes(tmp_path / "folder", users)


def test_synth_judge_ranks_answers_as_the_persona_in_both_orders(tmp_path):
    """The synth labels stage's judge through a scripted endpoint: it prefers the answer naming red,
    and otherwise always answers A, a position bias that both orders turn into a tie."""

    def responder(request: dict) -> str:
        text = user_text(request)
        a = text.split("Answer A:")[1].split("Answer B:")[0]
        b = text.split("Answer B:")[1]
        assert "loves red" in text  # the persona is the user's description
        red = [re.search(r"\bred\b", x) is not None for x in (a, b)]
        return '{"preferred": "%s"}' % ("B" if red == [False, True] else "A")

    with serve_openai(responder) as server:
        config = {
            "name": "t", "domain": "shopping advice",
            "backend": {"kind": "openai", "model": "stub", "base_url": server.base_url, "backoff_base": 0.01},
            "traits": {"given": [{"name": "colour", "values": ["red", "blue"]}]},
            "questions": {"domains": [{"name": "shop", "description": "buying", "questions": ["Which?"]}]},
        }  # fmt: skip
        (tmp_path / "synth.yaml").write_text(yaml.safe_dump(config))
        judge = SynthJudge(tmp_path / "synth.yaml", tmp_path / "cache.sqlite")
        user = User(user_id="p1", description="This person loves red things.")
        items = [(user, "Which coat?", ["the blue coat", "the red coat", "the green coat"])]
        scores = PairwiseLabeller(judge).score(items)
        sent = len(server.requests)
        assert PairwiseLabeller(judge).score(items) == scores and len(server.requests) == sent  # cached
    assert scores == [[0.25, 1.0, 0.25]]  # red beats both; blue and green tie (the verdict followed A)
    assert sent == 3 * 2  # three pairs, each in both orders
    assert op.make_labeller("exact", tmp_path).name == "exact"
    with pytest.raises(UserError, match="no description"):
        judge.prefer_many([(User(user_id="p2"), "q", "a", "b")])
