"""The export stage: core records (`User`, `Preference`) and a dataset card.

Records are built through the pydantic models of `fspo.data.schema`, so the files this stage writes
are exactly what every other stage reads. Preferences stream from the labels log to disk (atomic
rename at the end): nothing here holds all of them. The card says what the data is and what it cost:
sizes, users, traits, model, every prompt (name, version, text), tokens and money per stage, and how
many items failed or were dropped at each stage.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from fspo.core.files import AppendLog, atomic_open, atomic_write_json, atomic_write_text
from fspo.data.schema import Preference, User
from fspo.synth.config import SynthConfig, TraitDimension
from fspo.synth.prompts import PromptTemplate


def _run_totals(path: Path, current: dict[str, Any]) -> dict[str, Any]:
    """Client counters summed over every run of this folder (earlier, interrupted ones and this one)."""
    totals: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    previous = [rec["client"] for rec in AppendLog(path).read()]
    for c in [*previous, current]:
        for k in ("sent", "cache_hits", "succeeded", "reasks", "parse_failures"):
            totals[k] += c.get(k, 0)
        retries.update(c.get("retries", {}))
    return {"runs": len(previous) + 1, **totals, "retries": dict(retries)}


def _write_users(out: Path, cfg: SynthConfig) -> int:
    """users.jsonl: a `User` for each persona the persona stage made (status ok; failed ones are left
    out); returns how many."""
    users = 0
    with atomic_open(out / "users.jsonl") as f:
        for p in AppendLog(out / "personas" / "personas.jsonl").read():
            if p["status"] != "ok":
                continue
            user = User(
                user_id=p["user_id"],
                description=p["description"],
                metadata={
                    "traits": p["traits"],
                    "refine_rounds": p["rounds"],
                    "specific": p["specific"],
                    "source": "fspo.synth",
                    "dataset": cfg.name,
                },
            )
            f.write(user.model_dump_json() + "\n")
            users += 1
    return users


def _write_preferences(
    out: Path, cfg: SynthConfig, questions: dict[str, dict[str, Any]], answers: dict[str, dict[str, Any]]
) -> tuple[int, int]:
    """preferences.jsonl: a `Preference` for each label that named the same winner in both orders;
    returns how many, and how many users have at least one."""
    prefs = 0
    labeled_users: set[str] = set()
    with atomic_open(out / "preferences.jsonl") as f:
        for lab in AppendLog(out / "labels" / "labels.jsonl").read():
            if lab["status"] != "consistent":
                continue
            q, a = questions[lab["question_id"]], answers[lab["question_id"]]
            win = lab["winner"]
            lose = lab["views"][1] if win == lab["views"][0] else lab["views"][0]
            pref = Preference(
                user_id=lab["user_id"],
                question=q["question"],
                chosen=a["answers"][win],
                rejected=a["answers"][lose],
                metadata={
                    "question_id": q["question_id"],
                    "domain": q["domain"],
                    "chosen_viewpoint": a["viewpoints"][win],
                    "rejected_viewpoint": a["viewpoints"][lose],
                    "source": "fspo.synth",
                    "dataset": cfg.name,
                },
            )
            f.write(pref.model_dump_json() + "\n")
            prefs += 1
            labeled_users.add(lab["user_id"])
    return prefs, len(labeled_users)


def _usage_totals(cfg: SynthConfig, usage: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The card's usage: per prompt, summed over prompts, and the prices the cost was computed with."""
    return {
        "by_prompt": usage,
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage.values()),
        "completion_tokens": sum(u["completion_tokens"] for u in usage.values()),
        "cost": round(sum(u["cost"] for u in usage.values()), 6),
        "price_per_mtok": {
            "prompt": cfg.backend.price_prompt_per_mtok,
            "completion": cfg.backend.price_completion_per_mtok,
        },
    }


def export_dataset(
    out: Path,
    cfg: SynthConfig,
    dims: list[TraitDimension],
    prompts: dict[str, PromptTemplate],
    stages: dict[str, dict[str, Any]],
    usage: dict[str, dict[str, float]],
    client: dict[str, Any],
) -> dict[str, Any]:
    """Write the records and the card of the run in `out`; returns the counts of users and preferences.

    `stages`: the summaries of the stages before export; `usage`: tokens and cost per prompt over
    every request in the cache (`RequestCache.usage_by_stage`); `client`: this run's client counters
    (`ClientStats.as_dict`), added to those of earlier runs in `runs.jsonl`.
    """
    users = _write_users(out, cfg)
    questions = {q["question_id"]: q for q in AppendLog(out / "questions" / "questions.jsonl").read()}
    answers = {a["question_id"]: a for a in AppendLog(out / "answers" / "answers.jsonl").read()}
    prefs, labeled_users = _write_preferences(out, cfg, questions, answers)
    card = {
        "name": cfg.name,
        "domain": cfg.domain,
        "sizes": {
            "users": users,
            "users_with_preferences": labeled_users,
            "preferences": prefs,
            "questions": len(questions),
            "answers_per_question": cfg.answers.views_per_question,
        },
        "traits": [d.model_dump() for d in dims],
        "model": {
            "backend": cfg.backend.kind,
            "model": cfg.backend.model or cfg.backend.resolved_model(),
            "base_url": cfg.backend.resolved_base_url(),
            **cfg.backend.generation_params(),
        },
        "seed": cfg.seed,
        "stages": stages,
        "usage": _usage_totals(cfg, usage),
        "client_totals": _run_totals(out / "runs.jsonl", client),
        "prompts": {
            n: {"version": p.version, "digest": p.digest(), "system": p.system, "user": p.user}
            for n, p in prompts.items()
        },
    }
    atomic_write_json(out / "card.json", card)
    atomic_write_text(out / "README.md", render_card(card))
    return {"users": users, "preferences": prefs}


def render_card(card: dict[str, Any]) -> str:
    """A human-readable dataset card (Markdown) from the card's JSON."""
    s, u = card["sizes"], card["usage"]
    labels = card["stages"].get("labels", {}).get("status", {})
    judged = sum(labels.values()) or 1
    lines = [
        f"# {card['name']}",
        "",
        f"Synthetic users and preferences made with `fspo synth` for the domain: {card['domain']}.",
        "",
        "## Sizes",
        "",
        f"- users: {s['users']} ({s['users_with_preferences']} with preferences)",
        f"- preferences: {s['preferences']}",
        f"- questions: {s['questions']}, answers per question: {s['answers_per_question']}",
        f"- label self-consistency (same winner in both orders): {labels.get('consistent', 0) / judged:.1%}; "
        f"inconsistent dropped: {labels.get('inconsistent', 0)}, failed: {labels.get('failed', 0)}",
        "",
        "## Model",
        "",
        "```json",
        json.dumps(card["model"], indent=2),
        "```",
        "",
        "## Traits",
        "",
        *[f"- **{t['name']}**: {', '.join(t['values'])}" for t in card["traits"]],
        "",
        "## Usage and cost",
        "",
        f"- prompt tokens: {u['prompt_tokens']}, completion tokens: {u['completion_tokens']}",
        f"- cost: {u['cost']}",
        "",
        "| prompt | requests | prompt tokens | completion tokens | cost |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {v['requests']} | {v['prompt_tokens']} | {v['completion_tokens']} | {v['cost']} |"
            for k, v in u["by_prompt"].items()
        ],
        "",
        "## Stages",
        "",
        "```json",
        json.dumps(card["stages"], indent=2),
        "```",
        "",
        "## Prompts",
        "",
    ]
    for name, p in card["prompts"].items():
        lines += [
            f"### {name} (version {p['version']}, {p['digest']})",
            "",
            "```",
            p["system"].strip(),
            "---",
            p["user"].strip(),
            "```",
            "",
        ]
    return "\n".join(lines)
