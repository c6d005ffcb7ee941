"""Reading the files evaluation consumes: episodes, users, generations.

Core records go through `fspo.data.io` (one reader for the project: JSONL, JSON or Parquet, every
problem named 'file:line: field: message'). Generation files are eval's own JSONL rows; they are
read with the same row iterator and checked for the fields pairing needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fspo.core.errors import DataError
from fspo.data.episodes import load_episodes
from fspo.data.io import iter_rows, read_records, read_unique_records
from fspo.data.schema import Episode, User

TEST_SPLITS = ("test_seen", "test_unseen")
GENERATION_FIELDS = ("episode_id", "user_id", "question", "answer")


def load_test_episodes(path: str | Path, splits: Iterable[str] = TEST_SPLITS) -> list[Episode]:
    """Episodes from a record file, or from an episodes folder (its test splits, via `load_episodes`)."""
    path = Path(path)
    if path.is_dir():
        episodes: list[Episode] = []
        for split in splits:
            episodes.extend(load_episodes(path, split))
        if not episodes:
            raise DataError(f"{path}: no episodes in splits {', '.join(splits)}")
        return episodes
    episodes = read_records(path, Episode)
    if not episodes:
        raise DataError(f"{path}: no episodes (empty file)")
    return episodes


def users_by_id(path: str | Path) -> dict[str, User]:
    """The users of a users file by id; one id on two lines with different content is an error naming
    both lines (which description would the judge use?); an exact repeat is read once."""
    users, _ = read_unique_records(path, User)
    if not users:
        raise DataError(f"{path}: no users (empty file)")
    return {u.user_id: u for u in users}


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """('file:line', row) for every row; rows that are not JSON objects are a `DataError`."""
    problems: list[str] = []
    rows = []
    for where, row in iter_rows(path, problems):
        if isinstance(row, dict):
            rows.append((where, row))
        else:
            problems.append(f"{where}: record: expected a JSON object")
    if problems:
        raise DataError(f"{path}: bad rows", problems)
    return rows


def read_generations(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Generation records (from `fspo generate`), checked for the fields win rates need."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no generations (empty file)")
    problems, seen = [], {}
    for where, row in rows:
        for name in GENERATION_FIELDS:
            if not isinstance(row.get(name), str) or (name != "answer" and not row[name].strip()):
                problems.append(f"{where}: {name}: missing or not a string")
        eid = row.get("episode_id")
        if isinstance(eid, str):
            if eid in seen:
                problems.append(f"{where}: episode_id: {eid!r} already at {seen[eid]}")
            seen[eid] = where
    if problems:
        raise DataError(f"{path}: invalid generation records", problems)
    return rows
