"""The main job end to end on the tiny profile: every stage runs, writes its outputs, and is cached."""

from __future__ import annotations

import json

from fspo.quickstart import SYSTEMS, run_quickstart
from fspo.stages import MARKER


def test_quickstart_tiny_runs_every_stage_and_caches(tmp_path):
    out = tmp_path / "qs"
    summary = run_quickstart(out=out, profile="tiny")

    for stage in (
        "sim",
        "episodes",
        "model",
        "sft",
        "fspo",
        "sft_rat",
        "fspo_rat",
        "pop_sft",
        "pop_ipo",
        "generate",
        "accuracy",
        "report",
    ):
        assert (out / stage / MARKER).exists(), stage
    for system, *_ in SYSTEMS:
        rows = (out / "generate" / f"{system}.jsonl").read_text().splitlines()
        assert rows and all(json.loads(r)["system"] == system for r in rows)

    results = json.loads((out / "report" / "results.json").read_text())
    assert (out / "report" / "report.md").exists() and (out / "report" / "report.html").exists()
    assert summary["winrates"]["fspo vs base"]["unseen"]["n"] > 0
    assert results  # every table number is machine-readable

    # A second run is served from the stage markers: no stage re-runs.
    marker_times = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{MARKER}")}
    again = run_quickstart(out=out, profile="tiny")
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in out.glob(f"*/{MARKER}")} == marker_times


def test_findings_follow_the_table_on_unseen_users():
    from types import SimpleNamespace

    from fspo.quickstart import _findings

    def cell(system, opponent, rate, lo, hi, split="unseen"):
        return SimpleNamespace(
            system=system, opponent=opponent, split=split, win_rate=rate, ci_low=lo, ci_high=hi, n=150
        )

    found = _findings(
        [
            cell("fspo", "fspo-no-shots", 0.483, 0.40, 0.56),
            cell("fspo", "population-ipo", 0.88, 0.82, 0.92),
            cell("fspo-rat", "fspo", 0.30, 0.23, 0.38),
            cell("fspo-rat", "fspo", 0.90, 0.85, 0.94, split="seen"),  # seen users never decide a verdict
            cell("oracle", "base", 0.70, 0.62, 0.77),
            cell("fspo", "base", 0.85, 0.78, 0.90),
        ]
    )
    assert found[0] == "fspo is not distinguishable from fspo-no-shots on unseen users (48.3%, n=150)"
    assert found[1].startswith("fspo beats population-ipo")
    assert found[2].startswith("fspo-rat loses to fspo")
    assert found[3].startswith("RAT did not help: even the oracle")
