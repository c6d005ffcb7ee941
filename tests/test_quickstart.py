"""The main job end to end on the tiny profile: every stage runs, writes its outputs, and is cached."""

from __future__ import annotations

import json

from fspo.core.outputs import RUN_FILE
from fspo.core.stages import MARKER
from fspo.quickstart import generated_systems, load_profile, run_quickstart, stages


def test_quickstart_tiny_runs_every_stage_and_caches(tmp_path):
    out = tmp_path / "qs"
    summary = run_quickstart(out=out, profile="tiny")

    for stage in (
        "sim",
        "episodes",
        "contexts",
        "model",
        "sft",
        "fspo",
        "sft_rat",
        "fspo_rat",
        "rat_pairs",
        "fspo_rat_pairs",
        "pop_sft",
        "pop_ipo",
        "generate",
        "accuracy",
        "report",
    ):
        assert (out / stage / MARKER).exists(), stage
    # The output policy's list of what the quickstart writes (what `--overwrite` may replace) is whole.
    assert {p.name for p in out.iterdir()} == set(stages()) - {"onpolicy"} | {RUN_FILE}  # no rounds asked
    assert json.loads((out / RUN_FILE).read_text())["state"] == "finished"
    for system in (s.name for s in generated_systems(load_profile("tiny"))):
        rows = (out / "generate" / f"{system}.jsonl").read_text().splitlines()
        assert rows and all(json.loads(r)["system"] == system for r in rows)

    results = json.loads((out / "report" / "results.json").read_text())
    assert (out / "report" / "report.md").exists() and (out / "report" / "report.html").exists()
    assert summary["winrates"]["fspo vs base"]["unseen"]["n"] > 0
    assert set(summary["descriptions"]) == {"fspo-rat", "fspo-rat-1-shots"}  # tiny: 2 shots, also 1
    assert summary["descriptions"]["fspo-rat"]["test_unseen"]["values"] > 0
    # RAT's rejected targets knew the rejected persona: every training episode of the simulator.
    start = json.loads((out / "fspo_rat" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["render"]["rejected_description_own"] == 0 and start["render"]["kept"] > 0
    _assert_fspo_shares_contexts(out)
    assert results  # every table number is machine-readable

    # A second run is served from the stage markers: no stage re-runs.
    marker_times = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{MARKER}")}
    again = run_quickstart(out=out, profile="tiny")
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in out.glob(f"*/{MARKER}")} == marker_times
    assert summary["loops"]["fspo"]["test_unseen"]["n"] > 0  # degenerate answers counted per system
    ceiling = summary["ceilings"]["population-ipo"]["unseen"]  # the most any system can win against it
    assert ceiling["n"] == summary["winrates"]["fspo vs population-ipo"]["unseen"]["n"]
    assert 0.5 <= ceiling["win_rate"] <= 1.0
    assert "Win rates against their ceilings" in (out / "report" / "report.md").read_text()

    # Sampled decoding with personalized best-of-N: only generation and the report run again.
    sampled = tmp_path / "sampled.yaml"
    sampled.write_text(
        "decoding: {temperature: 1.0}\nbest_of: 3\nbest_of_curve: [1, 3]\n"
        # The tiny model's answers at temperature 1 are mostly alike: hotter samples differ enough to pair.
        "onpolicy: {rounds: 1, episodes_per_round: 24, samples: 4, max_new_tokens: 24,"
        " decoding: {temperature: 3.0}, train: {max_steps: 1, batch_size: 2}}\n"
    )
    best = run_quickstart(out=out, profile=load_profile("tiny", config=sampled), overwrite=True)
    assert (out / "fspo" / MARKER).stat().st_mtime_ns == marker_times[out / "fspo" / MARKER]
    fspo = [json.loads(r) for r in (out / "generate" / "fspo.jsonl").read_text().splitlines()]
    assert all(r["best_of"] == 3 and len(r["candidates"]) == 3 for r in fspo)
    assert all(r["reference"] == "sft" and r["decoding"]["temperature"] == 1.0 for r in fspo)
    rat = json.loads((out / "generate" / "fspo-rat.jsonl").read_text().splitlines()[0])
    assert rat["best_of"] == 1  # RAT answers once, after its own description
    first = [json.loads(r) for r in (out / "report" / "best-of-1" / "fspo.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in first] == [r["candidates"][0]["answer"] for r in fspo]  # N=1: sample 0
    assert set(best["best_of_curve"]) == {"1", "3"}
    assert "fspo vs population-ipo" in best["best_of_curve"]["3"]["winrates"]
    assert "Best-of-N curve" in (out / "report" / "report.md").read_text()
    # On-policy FSPO: one round from the FSPO model, labelled by the simulator, answering as a system.
    rounds = json.loads((out / "onpolicy" / "summary.json").read_text())["rounds"]
    assert len(rounds) == 1 and rounds[0]["pairs"] > 0
    assert best["winrates"]["fspo-onpolicy vs fspo"]["unseen"]["n"] > 0


def _cell(system, opponent, rate, lo, hi, split="unseen"):
    from types import SimpleNamespace

    return SimpleNamespace(
        system=system, opponent=opponent, split=split, win_rate=rate, ci_low=lo, ci_high=hi, n=150
    )


def _assert_fspo_shares_contexts(out):
    """tiny asks for 2 questions per context: FSPO's rows hold 2 queries of one user under one shot set."""
    contexts = [json.loads(r) for r in (out / "contexts" / "train.jsonl").read_text().splitlines()]
    first, second = contexts[0], contexts[1]
    assert first["user_id"] == second["user_id"] and first["shots"] == second["shots"]
    assert first["query"] != second["query"]
    fspo_start = json.loads((out / "fspo" / "metrics.jsonl").read_text().splitlines()[0])
    assert fspo_start["questions_per_context"] > 1


def test_findings_follow_the_table_on_unseen_users():
    from fspo.quickstart.report import findings

    found = findings(
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
    assert len(found) == 3  # no verdict for pairs missing from the table


def test_findings_measure_rat_against_its_oracle_and_its_descriptions():
    from fspo.quickstart.report import findings

    cells = [
        _cell("fspo-rat", "population-ipo", 0.60, 0.5, 0.7),
        _cell("oracle", "population-ipo", 0.80, 0.7, 0.9),
        _cell("oracle", "fspo-no-shots", 0.90, 0.84, 0.94),
    ]
    quality = {"fspo-rat": {"test_unseen": {"named": 0.5, "values": 240, "follows": 0.75}}}
    found = findings(cells, quality)
    assert found == [
        "oracle beats fspo-no-shots on unseen users (90.0%, n=150)",
        "fspo-rat recovers 75% of the oracle's win rate against population-ipo on unseen users "
        "(60.0% vs 80.0%)",
        "fspo-rat's inferred descriptions name 50% of unseen users' true trait values (n=240); its answers "
        "carry 75% of the values their own description names",
    ]
