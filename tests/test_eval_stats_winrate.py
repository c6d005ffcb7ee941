"""Win-rate math on known counts, pairing rules and their errors, the accuracy curve."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest

from conftest import cli_args, generations, write_jsonl
from fspo.core.errors import DataError, UserError
from fspo.eval.accuracy import accuracy_curve
from fspo.eval.judges import ExactRewardJudge
from fspo.eval.stats import bootstrap_interval, wilson_interval
from fspo.eval.winrates import load_winrates, summarize, winrate
from fspo.testing import toy_reward_for


@pytest.mark.parametrize("k,n", [(0, 10), (7, 10), (10, 10), (87, 100), (1, 3)])
def test_wilson_matches_scipy_on_integer_counts(k, n):
    ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_ties_count_half_and_known_numbers():
    w = summarize([1.0] * 6 + [0.5] * 2 + [0.0] * 2, "fspo", "base", "exact", "all")
    assert (w.wins, w.ties, w.losses, w.n) == (6, 2, 2, 10)
    assert w.win_rate == pytest.approx(0.7)
    assert (w.ci_low, w.ci_high) == pytest.approx(wilson_interval(7, 10))
    assert (w.ci_low, w.ci_high) == pytest.approx((0.39677, 0.89220), abs=1e-4)
    assert math.isnan(summarize([], "a", "b", "j", "all").win_rate)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))  # an empty evaluation has no interval


def test_bootstrap_interval_brackets_the_mean():
    low, high = bootstrap_interval([0.0, 1.0] * 50)
    assert low < 0.5 < high
    assert bootstrap_interval([0.5] * 4) == (0.5, 0.5)


@pytest.fixture
def files(tmp_path, eval_users, eval_episodes):
    fav = {u.user_id: u.metadata["fav"] for u in eval_users}
    good = generations(eval_episodes, "fspo", lambda e: f"{fav[e.user_id]} {fav[e.user_id]}")
    base = generations(eval_episodes, "base", lambda e: "plain answer")
    return {
        "users": write_jsonl(tmp_path / "users.jsonl", eval_users),
        "a": write_jsonl(tmp_path / "fspo.jsonl", good),
        "b": write_jsonl(tmp_path / "base.jsonl", base),
        "good": good,
        "base": base,
        "tmp": tmp_path,
        "episodes": eval_episodes,
    }


def test_winrate_with_exact_judge_and_splits(files):
    out = files["tmp"] / "wr.json"
    res = winrate(files["a"], files["b"], files["users"], ExactRewardJudge(toy_reward_for), out=out)
    by_split = {r.split: r for r in res.results}
    assert set(by_split) == {"all", "seen", "unseen"}
    assert by_split["all"].win_rate == 1.0 and by_split["all"].n == 8
    assert by_split["seen"].n == 4 and by_split["unseen"].n == 4
    assert by_split["all"].system == "fspo" and by_split["all"].opponent == "base"
    assert load_winrates(out) == res.results
    reverse = winrate(files["b"], files["a"], files["users"], ExactRewardJudge(toy_reward_for))
    assert reverse.results[0].win_rate == 0.0
    self_play = winrate(files["a"], files["a"], files["users"], ExactRewardJudge(toy_reward_for))
    assert self_play.results[0].win_rate == 0.5 and self_play.results[0].ties == 8


def test_missing_user_names_file_and_record(files, eval_users):
    path = write_jsonl(files["tmp"] / "few_users.jsonl", eval_users[:3])
    with pytest.raises(DataError, match=r"fspo.jsonl:\d+: user_id: 'u3' is not in .*few_users.jsonl"):
        winrate(files["a"], files["b"], path, ExactRewardJudge(toy_reward_for))


def test_empty_file(files):
    empty = files["tmp"] / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no generations"):
        winrate(empty, files["b"], files["users"], ExactRewardJudge(toy_reward_for))


def test_mismatched_episode_ids(files):
    shorter = write_jsonl(files["tmp"] / "short.jsonl", files["base"][:-1])
    missing = files["base"][-1]["episode_id"]
    with pytest.raises(DataError, match=f"episode_id: '{missing}' has no generation in .*short.jsonl"):
        winrate(files["a"], shorter, files["users"], ExactRewardJudge(toy_reward_for))


def test_mismatched_question_and_bad_rows(files):
    rows = [dict(r) for r in files["base"]]
    rows[0]["question"] = "something else?"
    other = write_jsonl(files["tmp"] / "other.jsonl", rows)
    with pytest.raises(DataError, match="question: differs"):
        winrate(files["a"], other, files["users"], ExactRewardJudge(toy_reward_for))
    rows = [dict(r) for r in files["base"]]
    del rows[1]["answer"]
    bad = write_jsonl(files["tmp"] / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl:2: answer: missing"):
        winrate(files["a"], bad, files["users"], ExactRewardJudge(toy_reward_for))


def test_unknown_judge_name(files):
    with pytest.raises(UserError, match="unknown judge 'nope'"):
        winrate(files["a"], files["b"], files["users"], "nope")


def test_winrate_cli_exact_judge(files, monkeypatch):
    from typer.testing import CliRunner

    from fspo.cli import app

    monkeypatch.setattr("fspo.eval.judges._sim_reward_for", toy_reward_for)
    out = files["tmp"] / "cli.json"
    paths = {"a": files["a"], "b": files["b"], "users": files["users"]}
    res = CliRunner().invoke(app, cli_args("eval", "winrate", **paths, judge="exact", out=out))
    assert res.exit_code == 0, res.output
    assert load_winrates(out)[0].win_rate == 1.0


def test_accuracy_curve_with_a_fake_scorer(files, eval_users):
    """A scorer that likes the user's favourite word once it appears in the shots: accuracy 1 with
    shots, 0.5 (all ties) with none; episodes with fewer shots than k are left out."""
    episodes = files["episodes"]
    fav_of = {u.user_id: u.metadata["fav"] for u in eval_users}

    def score(model, tokenizer, prompts, targets, batch_size=8):
        vals = []
        for p, t in zip(prompts, targets, strict=True):
            favs = [w for w in fav_of.values() if f"Preferred Response \nGet the {w}" in p.split("# Task")[0]]
            vals.append(float(sum(t.count(w) for w in set(favs))))
        return torch.tensor(vals)

    res = accuracy_curve(None, None, episodes, [0, 2, 5], score_fn=score)
    seen = {p["shots"]: p for p in res["splits"]["test_seen"]}
    assert res["scoring"] == "log_likelihood"
    assert seen[0]["accuracy"] == 0.5 and seen[2]["accuracy"] == 1.0 and seen[2]["n"] == 4
    assert seen[5]["n"] == 0 and seen[5]["skipped"] == 4
    with_ref = accuracy_curve("policy", None, episodes, [2], ref_model="policy", score_fn=score, beta=0.1)
    assert with_ref["scoring"] == "implicit_reward"
    assert with_ref["splits"]["test_seen"][0]["accuracy"] == 0.5  # policy == reference: zero margins


def test_accuracy_curve_with_a_tiny_model(files, eval_lm):
    episodes = files["episodes"]
    model, tok = eval_lm
    res = accuracy_curve(model, tok, episodes, [0, 1, 3], batch_size=4)
    for points in res["splits"].values():
        assert [p["shots"] for p in points] == [0, 1, 3]
        assert all(0 <= p["ci_low"] <= p["accuracy"] <= p["ci_high"] <= 1 for p in points)


def test_prefix_shared_pair_scores_equal_separate_target_scores(files, eval_lm):
    """The accuracy curve's default scorer (one prompt pass per pair) gives `score_targets`' numbers."""
    from fspo.data.template import render
    from fspo.eval.accuracy import pair_margins
    from fspo.infer.logps import score_pairs, score_targets

    episodes = files["episodes"]
    rendered = [render(e) for e in episodes]
    model, tok = eval_lm
    prompts = [r.prompt for r in rendered]
    chosen, rejected = score_pairs(
        model, tok, prompts, [r.chosen for r in rendered], [r.rejected for r in rendered], 3
    )
    separate = score_targets(
        model, tok, prompts * 2, [r.chosen for r in rendered] + [r.rejected for r in rendered], 3
    )
    assert torch.allclose(torch.cat([chosen, rejected]), separate, atol=1e-4)
    shared = pair_margins(model, tok, episodes, 1, batch_size=3)
    plain = pair_margins(model, tok, episodes, 1, batch_size=3, score_fn=score_targets)
    assert shared == pytest.approx(plain, abs=1e-4)


def test_accuracy_with_zero_episodes_is_refused_before_any_work() -> None:
    # --max-episodes 0 used to score nothing and write NaN accuracies into the JSON.
    from typer.testing import CliRunner

    from fspo.cli import app

    result = CliRunner().invoke(
        app, ["eval", "accuracy", "--model", "m", "--episodes", "e", "--max-episodes", "0"]
    )
    assert result.exit_code == 2 and "max-episodes" in result.output
