"""Unit tests of fspo.synth's pure parts: config, prompts, reply models, statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fspo.core.errors import UserError
from fspo.llm import ParseError, parse_reply
from fspo.synth.config import load_config
from fspo.synth.parsing import JudgeReply, ViewpointsReply
from fspo.synth.pipeline import normalize_question
from fspo.synth.prompts import NAMES, load_prompts
from fspo.synth.stats import distinct_n, label_agreement

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "synth"


@pytest.mark.parametrize("name", ["reviews", "elix", "roleplay"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.backend.kind == "openai" and cfg.traits.given and cfg.questions.domains


def test_roleplay_config_is_at_paper_scale() -> None:
    cfg = load_config(CONFIGS / "roleplay.yaml")
    assert cfg.personas.count == 1500
    assert cfg.personas.count * cfg.labels.per_user >= 900_000


def test_invalid_config_names_file_and_field(tmp_path: Path) -> None:
    raw = (CONFIGS / "reviews.yaml").read_text().replace("max_concurrency: 16", "max_concurrency: 0")
    bad = tmp_path / "bad.yaml"
    bad.write_text(raw)
    with pytest.raises(UserError, match=r"bad\.yaml.*\n.*backend\.max_concurrency"):
        load_config(bad)
    bad.write_text(raw.replace("max_concurrency: 0", "max_concurency: 4"))
    with pytest.raises(UserError, match=r"backend\.max_concurency: Extra inputs"):
        load_config(bad)
    bad.write_text("name: x\n")
    with pytest.raises(UserError, match="domain: Field required"):
        load_config(bad)
    with pytest.raises(UserError, match="no such config"):
        load_config(tmp_path / "missing.yaml")


def test_prompts_are_versioned_files_and_overridable(tmp_path: Path) -> None:
    prompts = load_prompts()
    assert set(prompts) == set(NAMES)
    assert all(p.version >= 1 for p in prompts.values())
    msgs = prompts["judge"].render(persona="P", question="Q", answer_a="a", answer_b="b")
    assert msgs[0]["role"] == "system" and "Answer A:\na" in msgs[1]["content"]
    (tmp_path / "judge.yaml").write_text("name: judge\nversion: 7\nuser: 'Pick: $answer_a or $answer_b'\n")
    over = load_prompts(tmp_path)
    assert over["judge"].version == 7 and over["judge"].digest() != prompts["judge"].digest()
    (tmp_path / "x.yaml").write_text("name: nope\nversion: 1\nuser: hi\n")
    with pytest.raises(UserError, match="unknown prompt 'nope'"):
        load_prompts(tmp_path)


def test_reply_models_accept_common_spellings() -> None:
    assert parse_reply('Sure!\n```json\n{"preferred": "b"}\n```', JudgeReply).preferred == "B"
    assert parse_reply('{"x": 1} then {"preferred": "Answer A"}', JudgeReply).preferred == "A"
    assert parse_reply('{"viewpoints": ["a {b}", "c \\" }"]}', ViewpointsReply).viewpoints[1] == 'c " }'
    with pytest.raises(ParseError, match="'preferred'"):
        parse_reply('{"preferred": "C"}', JudgeReply)


def test_normalize_question_for_dedup() -> None:
    assert normalize_question("What is  Entropy?") == normalize_question("what is entropy")


def test_distinct_n() -> None:
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([], 2) == 0.0


def test_label_agreement_and_disagreement_matrix(tmp_path: Path) -> None:
    def lab(u: str, q: str, winner: int | None, status: str = "consistent") -> dict:
        return {"user_id": u, "question_id": q, "views": [1, 0], "winner": winner, "status": status}

    rows = [
        lab("u1", "q1", 0), lab("u2", "q1", 0), lab("u3", "q1", 1),
        lab("u1", "q2", 1), lab("u2", "q2", 0), lab("u3", "q2", 0),
        lab("u1", "q3", None, "inconsistent"), lab("u3", "q4", 0),
    ]  # fmt: skip
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = label_agreement(path)
    assert res["labels"] == {"consistent": 7, "inconsistent": 1}
    assert res["consistency"] == pytest.approx(7 / 8)
    assert res["shared_pairs"] == 2
    # u1 vs others: q1 others {0,1} tie -> skipped; q2 others both 0, u1 said 1 -> disagree.
    assert res["per_user"]["u1"]["agreement_with_majority"] == 0.0
    assert res["per_user"]["u1"]["consistency"] == pytest.approx(2 / 3)
    assert res["per_user"]["u2"]["pairs_compared"] == 0  # the others tie on both q1 and q2
    assert res["per_user"]["u2"]["agreement_with_majority"] is None
    assert (
        res["per_user"]["u3"]["pairs_compared"] == 1 and res["per_user"]["u3"]["agreement_with_majority"] == 0
    )
    m = res["disagreement_matrix"]
    assert m["users"] == ["u1", "u2", "u3"]
    assert m["values"][0] == [0.0, 0.5, 1.0]
    assert m["values"][1][2] == 0.5


def test_backend_model_from_the_environment_and_prices_per_million(tmp_path: Path, monkeypatch) -> None:
    raw = (CONFIGS / "reviews.yaml").read_text()
    cfg = load_config(CONFIGS / "reviews.yaml")
    assert cfg.backend.cost(1_000_000, 1_000_000) == pytest.approx(0.15 + 0.6)
    monkeypatch.setenv("FSPO_SYNTH_MODEL", "from-env")
    monkeypatch.setenv("FSPO_SYNTH_BASE_URL", "http://127.0.0.1:9/v1")
    bad = tmp_path / "synth.yaml"
    bad.write_text(raw.replace("  model: gpt-4o-mini", "").replace("price_prompt_per_mtok: 0.15", ""))
    backend = load_config(bad).backend
    assert backend.resolved_model() == "from-env" and backend.resolved_base_url() == "http://127.0.0.1:9/v1"
    bad.write_text(raw.replace("price_prompt_per_mtok", "price_prompt_per_1k"))
    with pytest.raises(UserError, match=r"backend\.price_prompt_per_1k: Extra inputs"):
        load_config(bad)
