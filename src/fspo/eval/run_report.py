"""`fspo report RUN_DIR`: find the evaluation outputs under a run folder and write the report.

Outputs are self-describing (``"kind": "fspo.winrate"`` / ``"fspo.accuracy"`` in the JSON, generation
records with ``episode_id``/``system``/``answer``), so the report needs no fixed folder layout: it
globs the run folder. Users, preferences and episodes (for descriptions, the disagreement matrix and
shot summaries) are taken from explicit paths, or from ``users.jsonl`` / ``preferences.jsonl`` /
test episode files found under the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fspo.core.errors import UserError
from fspo.core.files import json_lines
from fspo.data.io import format_validation_error, read_records
from fspo.data.schema import Episode, Preference, User
from fspo.eval.report import collect_examples, preference_disagreement, write_report
from fspo.eval.winrates import WinRate

MAX_MATRIX_USERS = 40


def _json_kind(path: Path) -> tuple[str | None, Any]:
    """The ``kind`` of a JSON file and its content. A file that is not JSON at all (a result cut short
    by a kill or a full disk) is an error naming it: skipping it would drop its results from the
    report without a word."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); fix or remove it"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}:{err.lineno}: column {err.colno}: not valid JSON ({err.msg}); the file is cut short "
            "or damaged: rerun the step that wrote it, or remove it"
        ) from None
    return (data.get("kind") if isinstance(data, dict) else None), data


def _generation_file(path: Path) -> list[dict[str, Any]] | None:
    """The records of a generation JSONL (its first line has episode_id/answer/system), else None; a
    broken later line of a generation file is an error naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline() or "null")
    except (UnicodeDecodeError, ValueError):
        return None  # not a generation file (or not even JSON lines): not ours to judge
    if not (isinstance(first, dict) and {"episode_id", "answer", "system"} <= first.keys()):
        return None
    records = []
    remedy = (
        "the generation file is cut short or damaged: rerun `fspo generate` (it resumes) or remove the line"
    )
    for where, record in json_lines(path, remedy):
        if not (isinstance(record, dict) and {"episode_id", "answer", "system"} <= record.keys()):
            raise UserError(f"{where}: not a generation record (needs episode_id, answer, system)")
        records.append(record)
    return records


def _first(run: Path, name: str) -> Path | None:
    found = sorted(run.rglob(name))
    return found[0] if found else None


def report_from_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    users: str | Path | None = None,
    preferences: str | Path | None = None,
    episodes: str | Path | None = None,
    title: str | None = None,
    max_users: int = 3,
) -> dict[str, Path]:
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: not a folder")
    out = Path(out_dir) if out_dir else run / "report"
    winrates: list[WinRate] = []
    accuracy: dict[str, Any] = {}
    generations: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(run.rglob("*.json")):
        if out in path.parents:
            continue
        kind, data = _json_kind(path)
        if kind == "fspo.winrate":
            try:
                winrates += [WinRate.model_validate(r) for r in data["results"]]
            except ValidationError as err:
                problems = "\n  ".join(format_validation_error(f"{path}: results", err)[:10])
                raise UserError(f"{path}: not a valid win-rate result:\n  {problems}") from None
            except (KeyError, TypeError):
                raise UserError(f"{path}: not a valid win-rate result (needs a 'results' list)") from None
        elif kind == "fspo.accuracy":
            accuracy[str(data.get("model") or path.parent.name)] = data
    for path in sorted(run.rglob("*.jsonl")):
        recs = _generation_file(path)
        if recs:
            generations.setdefault(str(recs[0]["system"]), []).extend(recs)
    if not (winrates or accuracy or generations):
        raise UserError(f"{run}: no evaluation outputs found (win-rate or accuracy JSON, generation JSONL)")

    users_path = Path(users) if users else _first(run, "users.jsonl")
    prefs_path = Path(preferences) if preferences else _first(run, "preferences.jsonl")
    user_map = {u.user_id: u for u in read_records(users_path, User)} if users_path else {}
    eps: list[Episode] = []
    for path in [Path(episodes)] if episodes else sorted(run.rglob("test_*.jsonl")):
        try:
            eps += read_records(path, Episode)
        except UserError:
            if episodes:
                raise
    disagreement = None
    if prefs_path:
        prefs = read_records(prefs_path, Preference)
        ids = sorted({p.user_id for p in prefs})[:MAX_MATRIX_USERS]
        disagreement = preference_disagreement(prefs, ids)
    examples = collect_examples(generations, eps, user_map, max_users=max_users) if generations else []
    notes = [f"Built from {run}."]
    return write_report(
        out,
        winrates,
        accuracy or None,
        examples,
        disagreement,
        title or f"FSPO evaluation: {run.name}",
        notes,
    )
