"""The report: files exist, every table number is in results.json, `fspo report RUN_DIR` works."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import generations, write_jsonl
from fspo.data.schema import Preference
from fspo.eval.judges import ExactRewardJudge
from fspo.eval.report import collect_examples, preference_disagreement, write_report
from fspo.eval.winrates import summarize, winrate
from fspo.testing import toy_reward_for

SYSTEMS = ["base", "population-ipo", "few-shot-prompting", "few-shot-pref-ft", "fspo", "fspo-rat", "oracle"]


def _winrates():
    out = []
    for i, system in enumerate(SYSTEMS[1:]):
        for split in ("seen", "unseen", "all"):
            scores = [1.0] * (5 + i) + [0.5] * 2 + [0.0] * (5 - i)
            out.append(summarize(scores, system, "base", "exact", split))
    out.append(summarize([1.0, 0.0, 1.0], "fspo-rat", "fspo", "exact", "all"))
    return out


ACCURACY = {
    "kind": "fspo.accuracy",
    "model": "fspo",
    "scoring": "implicit_reward",
    "note": "",
    "beta": 1.0,
    "splits": {
        s: [
            {
                "shots": k,
                "accuracy": 0.5 + k / 20,
                "ci_low": 0.4 + k / 20,
                "ci_high": 0.6 + k / 20,
                "n": 40,
                "correct": 0,
                "skipped": 0,
            }
            for k in (0, 1, 2, 4, 8)
        ]
        for s in ("test_seen", "test_unseen")
    },
}


def test_write_report_files_and_results_json(tmp_path, eval_users, eval_episodes):
    users, episodes = eval_users, eval_episodes
    gens = {
        "base": generations(episodes, "base", lambda e: "plain answer"),
        "fspo-rat": [
            dict(g, description="Likes red.") for g in generations(episodes, "fspo-rat", lambda e: "red")
        ],
    }
    examples = collect_examples(gens, episodes, {u.user_id: u for u in users}, max_users=2)
    prefs = [
        Preference(user_id=u.user_id, question="q?", chosen=c, rejected=r)
        for u, (c, r) in zip(users, [("x", "y"), ("x", "y"), ("y", "x"), ("x", "y")], strict=True)
    ]
    matrix, ids = preference_disagreement(prefs)
    winrates = _winrates()
    paths = write_report(tmp_path / "rep", winrates, ACCURACY, examples, (matrix, ids), "Test", ["a note"])

    for key in ("markdown", "html", "results", "accuracy_png", "disagreement_png"):
        assert paths[key].exists() and paths[key].stat().st_size > 0, key
    assert paths["accuracy_png"].read_bytes()[:4] == b"\x89PNG"
    results = json.loads(paths["results"].read_text())
    md = paths["markdown"].read_text()
    for w in winrates:  # every number of every table, machine-readable and shown
        match = [
            r
            for r in results["winrates"]
            if (r["system"], r["opponent"], r["judge"], r["split"])
            == (w.system, w.opponent, w.judge, w.split)
        ]
        assert len(match) == 1
        assert match[0]["win_rate"] == pytest.approx(w.win_rate) and match[0]["n"] == w.n
        assert match[0]["ci_low"] == pytest.approx(w.ci_low) and match[0]["ci_high"] == pytest.approx(
            w.ci_high
        )
        assert f"{100 * w.win_rate:.1f} [{100 * w.ci_low:.1f}, {100 * w.ci_high:.1f}] n={w.n}" in md
    acc = results["accuracy"]["fspo"]["splits"]["test_seen"]
    assert [p["shots"] for p in acc] == [0, 1, 2, 4, 8] and all("ci_low" in p for p in acc)
    assert "FSPO + RAT" in md and "Oracle description" in md
    assert "Likes red." in md  # the RAT description of the example
    html = paths["html"].read_text()
    assert "<img src='accuracy.png'" in html and "<table>" in html and "a note" in html
    assert md.index("Population IPO") < md.index("Few-shot prompting") < md.index("| FSPO |")  # paper order


def test_preference_disagreement():
    prefs = [
        Preference(user_id="a", question="q", chosen="x", rejected="y"),
        Preference(user_id="b", question="q", chosen="y", rejected="x"),
        Preference(user_id="c", question="q", chosen="x", rejected="y"),
        Preference(user_id="d", question="other", chosen="x", rejected="y"),
    ]
    m, ids = preference_disagreement(prefs)
    assert ids == ["a", "b", "c", "d"]
    assert m[0, 1] == 1.0 and m[0, 2] == 0.0 and m[0, 0] == 0.0 and np.isnan(m[0, 3])


def test_report_cli_on_a_run_folder(tmp_path, eval_users, eval_episodes):
    from typer.testing import CliRunner

    from fspo.cli import app

    users, episodes = eval_users, eval_episodes
    fav = {u.user_id: u.metadata["fav"] for u in users}
    run = tmp_path / "run"
    (run / "gen").mkdir(parents=True)
    write_jsonl(run / "users.jsonl", users)
    a = write_jsonl(run / "gen" / "fspo.jsonl", generations(episodes, "fspo", lambda e: fav[e.user_id]))
    b = write_jsonl(run / "gen" / "base.jsonl", generations(episodes, "base", lambda e: "plain"))
    winrate(a, b, run / "users.jsonl", ExactRewardJudge(toy_reward_for), out=run / "fspo_vs_base.json")
    (run / "accuracy.json").write_text(json.dumps(ACCURACY))
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    results = json.loads((run / "report" / "results.json").read_text())
    assert {r["split"] for r in results["winrates"]} == {"all", "seen", "unseen"}
    assert results["examples"] and set(results["examples"][0]["answers"]) == {"base", "fspo"}
    assert (run / "report" / "report.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["report", str(empty)])
    assert res.exit_code != 0 and "no evaluation outputs" in str(res.exception)
