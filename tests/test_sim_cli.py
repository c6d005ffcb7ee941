"""`fspo sim run / stats / corpus`: files written atomically, readable by the data stage."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fspo.cli import app
from fspo.data.io import read_dataset_dir
from fspo.sim import reward_for

runner = CliRunner()


def test_run_writes_a_dataset_folder_and_stats_reads_it(tmp_path) -> None:
    out = tmp_path / "sim"
    args = ["sim", "run", "--users", "12", "--prefs-per-user", "6", "--seed", "3", "--out", str(out)]
    result = runner.invoke(app, [*args, "--option", "topics=5"])
    assert result.exit_code == 0, result.output
    assert "disagreement" in result.output and "vocabulary" in result.output
    prefs, users, _ = read_dataset_dir(out)
    assert len(users) == 12 and len(prefs) == 12 * 6
    meta = json.loads((out / "sim_meta.json").read_text())
    assert meta["domain"] == "roleplay" and meta["seed"] == 3 and meta["options"]["topics"] == 5
    by_id = {u.user_id: u for u in users}
    for p in prefs:  # the judge needs nothing but users.jsonl
        r = reward_for(by_id[p.user_id])
        assert r(p.question, p.chosen) > r(p.question, p.rejected)
    again = runner.invoke(app, ["sim", "stats", str(out)])
    assert again.exit_code == 0 and "contested pairs" in again.output
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


def test_corpus_and_bad_input(tmp_path) -> None:
    out = tmp_path / "corpus.jsonl"
    result = runner.invoke(app, ["sim", "corpus", "--domain", "reviews", "--n", "30", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 30
    bad = runner.invoke(app, ["sim", "run", "--domain", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
