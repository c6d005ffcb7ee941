"""`fspo synth run` end to end over real HTTP, against the stub server with injected failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from fspo.cli import app
from fspo.core.stages import MARKER
from fspo.data.schema import Preference, User
from fspo.testing import serve_openai
from synth_script import Flaky


def small_config(base_url: str, out: Path, **backend: Any) -> dict[str, Any]:
    return {
        "name": "test-synth",
        "out": str(out),
        "seed": 3,
        "domain": "reviews of movies",
        "backend": {"kind": "openai", "model": "stub", "base_url": base_url, "backoff_base": 0.01,
                    "max_concurrency": 4, "timeout": 0.25, "price_prompt_per_mtok": 1000.0,
                    "price_completion_per_mtok": 2000.0, **backend},
        "traits": {"given": [{"name": "tone", "values": ["dry", "warm"]},
                             {"name": "length", "values": ["short", "long"]}], "propose": 1},
        "personas": {"count": 5, "max_refine_rounds": 2},
        "questions": {"domains": [{"name": "movie reviews", "description": "review a movie",
                                   "questions": ["Review Alien.", "review  alien"], "generate": 6,
                                   "per_request": 4}]},
        "answers": {"views_per_question": 3},
        "labels": {"per_user": 8, "pair_pool": 12},
    }  # fmt: skip


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pipeline_end_to_end_with_failures_then_cached_rerun(tmp_path: Path) -> None:
    runner = CliRunner()
    flaky = Flaky(every=6, slow=0.6)
    with serve_openai(flaky) as server:
        cfg_path = tmp_path / "synth.yaml"
        cfg_path.write_text(yaml.safe_dump(small_config(server.base_url, tmp_path / "out")))
        res = runner.invoke(app, ["synth", "run", str(cfg_path), "--no-progress"])
        assert res.exit_code == 0, res.output
        sent_first = len(server.requests)
        res2 = runner.invoke(app, ["synth", "run", str(cfg_path), "--no-progress"])
        assert res2.exit_code == 0, res2.output
        assert len(server.requests) == sent_first  # a finished run re-runs from disk: nothing sent
    out = tmp_path / "out"
    assert all(flaky.injected[k] > 0 for k in ("malformed", "429", "500", "slow")), flaky.injected

    # Core records, validated by the shared schema.
    users = [User.model_validate(u) for u in _jsonl(out / "users.jsonl")]
    prefs = [Preference.model_validate(p) for p in _jsonl(out / "preferences.jsonl")]
    assert len(users) == 5
    # Persona refinement: the script finds a seed persona under-specified once, then extended enough.
    assert all("EXTENDED" in u.description and u.metadata["refine_rounds"] == 1 for u in users)
    assert {"tone", "length", "proposed0"} <= set(users[0].metadata["traits"])

    # Questions: 2 given (one a duplicate up to case/spacing) + 6 generated, each batch repeating one.
    questions = _jsonl(out / "questions" / "questions.jsonl")
    texts = [q["question"] for q in questions]
    assert texts[0] == "Review Alien." and len(texts) == len(set(texts)) == 1 + 6
    done = json.loads((out / "questions" / MARKER).read_text())["summary"]
    assert done["duplicates_dropped"] == 2  # "review  alien", and the repeat in batch 2

    # Labels: every pair judged in both orders; the script's erratic verdicts are dropped, counted.
    labels = _jsonl(out / "labels" / "labels.jsonl")
    assert len(labels) == 5 * 8
    status = {s: sum(lab["status"] == s for lab in labels) for s in ("consistent", "inconsistent", "failed")}
    assert status["failed"] == 0 and status["inconsistent"] > 0
    assert len(prefs) == status["consistent"]
    for p in prefs:
        assert p.metadata["chosen_viewpoint"] != p.metadata["rejected_viewpoint"]
        assert p.metadata["chosen_viewpoint"] in p.chosen

    card = json.loads((out / "card.json").read_text())
    assert card["sizes"]["preferences"] == len(prefs) and card["model"]["model"] == "stub"
    assert card["prompts"]["judge"]["version"] == 1
    assert card["usage"]["cost"] > 0 and card["usage"]["by_prompt"]["judge"]["requests"] >= 2 * len(labels)
    totals = card["client_totals"]
    assert set(totals["retries"]) == {"rate_limit", "server", "timeout"}
    assert totals["reasks"] == flaky.injected["malformed"]
    assert "label self-consistency" in (out / "README.md").read_text()

    stats = runner.invoke(app, ["synth", "stats", str(out), "--json"])
    assert stats.exit_code == 0, stats.output
    report = json.loads(stats.output)
    assert report["labels"] == {k: v for k, v in status.items() if v}
    assert 0 < report["diversity"]["answers"]["distinct_1"] < 1
    assert len(report["disagreement_matrix"]["users"]) == 5 and report["shared_pairs"] > 0


def test_invalid_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = small_config("http://127.0.0.1:9/v1", tmp_path / "out")
    cfg["labels"]["per_user"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-c", "from fspo.cli import main; main()", "synth", "run", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "labels.per_user" in proc.stderr
