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
