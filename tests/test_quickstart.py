"""The main job end to end on the tiny profile: every stage runs, writes its outputs, and is cached."""

from __future__ import annotations

import json

from fspo.core.outputs import RUN_FILE
from fspo.core.stages import MARKER
from fspo.quickstart import GENERATED_SYSTEMS, STAGES, run_quickstart


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
    # The output policy's list of what the quickstart writes (what `--overwrite` may replace) is whole.
    assert {p.name for p in out.iterdir()} == set(STAGES) | {RUN_FILE}
    assert json.loads((out / RUN_FILE).read_text())["state"] == "finished"
    for system, *_ in GENERATED_SYSTEMS:
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


def _cell(system, opponent, rate, lo, hi, split="unseen"):
    from types import SimpleNamespace

    return SimpleNamespace(
        system=system, opponent=opponent, split=split, win_rate=rate, ci_low=lo, ci_high=hi, n=150
    )


def test_findings_follow_the_table_on_unseen_users():
    from fspo.quickstart import _findings

    found = _findings(
        [
            _cell("fspo", "fspo-no-shots", 0.483, 0.40, 0.56),
            _cell("fspo", "population-ipo", 0.88, 0.82, 0.92),
            _cell("fspo-rat", "fspo", 0.30, 0.23, 0.38),
            _cell("fspo-rat", "fspo", 0.90, 0.85, 0.94, split="seen"),  # seen users never decide a verdict
            _cell("oracle", "fspo", 0.31, 0.24, 0.39),
        ]
    )
    assert found[0] == "fspo is not distinguishable from fspo-no-shots on unseen users (48.3%, n=150)"
    assert found[1].startswith("fspo beats population-ipo")
    assert found[2].startswith("fspo-rat loses to fspo")
    assert found[3].startswith("RAT did not help, and even the oracle")
    assert len(found) == 4  # no verdict for pairs missing from the table


def test_findings_say_why_rat_did_not_help_from_the_oracle():
    from fspo.quickstart import _findings

    def why(oracle_cell):
        found = _findings([_cell("fspo-rat", "fspo", 0.49, 0.40, 0.58), oracle_cell])
        return found[-1]

    assert why(_cell("oracle", "fspo", 0.80, 0.72, 0.86)).startswith("RAT did not help, but the oracle did")
    tie = why(_cell("oracle", "fspo", 0.52, 0.43, 0.61))
    assert tie.startswith("RAT did not help, and neither does the true description (oracle vs FSPO 52.0%)")
    # RAT that helps needs no explanation.
    assert not any(
        f.startswith("RAT did not help")
        for f in _findings([_cell("fspo-rat", "fspo", 0.7, 0.6, 0.8), _cell("oracle", "fspo", 0.5, 0.4, 0.6)])
    )
