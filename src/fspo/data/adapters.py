"""Import the FSPO paper's released preference datasets into `Preference` and `User` records.

The paper released three domains, in two column layouts (as read by its official dataloaders):

  * Roleplay: ``x`` (question), ``yw`` (preferred), ``yl`` (dispreferred), ``level`` (the
    persona group: our user) and ``score_persona`` (the persona text: the user's description).
  * Review and ELIX: ``prompt``, ``response_x``, ``response_y``, ``label`` (0 means
    ``response_x`` is preferred, 1 means ``response_y``), ``level_x``/``level_y`` (the levels the
    two answers were written for) and ``scorer_level`` (the user who judged: our user).

Descriptions follow the official code: ELIX "The user is {level}.", Review e.g. "This user
prefers positive and concise reviews." The rejected answer's level (`level_x` or `level_y`) gives
`Preference.rejected_description` in the same words, as the official RAT targets use it. Two
official filters are reproduced and *reported*, never applied silently: ELIX keeps only rows
whose scorer level wrote one of the two answers (``scorer_match``), and Review marks the
interpolated user types ("positive+concise", ...) as ``split: test`` in `User.metadata`, because
the paper holds them out as unseen users.

Every other column is kept in `Preference.metadata`, so nothing of the source is lost.
Files may be JSONL, Parquet or CSV (Parquet/CSV through `datasets`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fspo.core.errors import DataError, UserError
from fspo.data.io import format_validation_error, iter_rows
from fspo.data.schema import Preference, User

ROLEPLAY_COLUMNS = ("x", "yw", "yl", "level", "score_persona")
PAIR_COLUMNS = ("prompt", "response_x", "response_y", "label", "scorer_level")

REVIEW_DESCRIPTIONS = {
    "negative": "This user prefers negative reviews.",
    "positive": "This user prefers positive reviews.",
    "concise": "This user prefers concise reviews.",
    "verbose": "This user prefers verbose reviews.",
    "positive+concise": "This user prefers positive and concise reviews.",
    "negative+concise": "This user prefers negative and concise reviews.",
    "positive+verbose": "This user prefers positive and verbose reviews.",
    "negative+verbose": "This user prefers negative and verbose reviews.",
}


class SourceFormat(StrEnum):
    ROLEPLAY = "roleplay"
    REVIEW = "review"
    ELIX = "elix"


@dataclass
class ImportResult:
    """The imported records plus what the import left out and why (printed by the CLI)."""

    preferences: list[Preference]
    users: list[User]
    rows: int = 0
    filtered: int = 0  # rows left out on purpose by an official filter (see `notes`)
    notes: list[str] = field(default_factory=list)


class _RowError(Exception):
    """A bad cell: carries the column name for the 'file:row: column: message' line."""

    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


def _text(row: dict[str, Any], column: str) -> str:
    if column not in row:
        raise _RowError(column, "missing column")
    value = row[column]
    if value is None:
        raise _RowError(column, "empty value")
    if not isinstance(value, str):
        raise _RowError(column, f"expected text, got {type(value).__name__} {value!r}")
    return value.strip()


def _level(row: dict[str, Any], column: str) -> str:
    """A level/user column: text, or a number (CSV readers make 3 into 3.0 when a cell is empty)."""
    if column not in row:
        raise _RowError(column, "missing column")
    value = row[column]
    if isinstance(value, bool) or value is None:
        raise _RowError(column, "empty value" if value is None else f"expected a level, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int | float):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise _RowError(column, f"expected a level, got {value!r}")
    return value.strip()


def _label(row: dict[str, Any]) -> int:
    value = row.get("label")
    if "label" not in row:
        raise _RowError("label", "missing column")
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    raise _RowError("label", f"must be 0 (response_x preferred) or 1 (response_y preferred), got {value!r}")


def _extras(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used and v is not None}


@dataclass
class _Converted:
    preference: Preference
    description: str | None


def _convert_roleplay(row: dict[str, Any]) -> _Converted | None:
    user = _level(row, "level")
    persona = row.get("score_persona")
    description = persona.strip() if isinstance(persona, str) and persona.strip() else None
    pref = Preference(
        user_id=user,
        question=_text(row, "x"),
        chosen=_text(row, "yw"),
        rejected=_text(row, "yl"),
        metadata=_extras(row, ("x", "yw", "yl", "level")),
    )
    return _Converted(pref, description)


def _convert_pair(row: dict[str, Any], describe: Callable[[str], str | None]) -> _Converted:
    user = _level(row, "scorer_level")
    label = _label(row)
    x, y = _text(row, "response_x"), _text(row, "response_y")
    chosen, rejected = (x, y) if label == 0 else (y, x)
    # The level the rejected answer was written for, when the row says it (RAT's rejected target).
    rejected_level = "level_y" if label == 0 else "level_x"
    pref = Preference(
        user_id=user,
        question=_text(row, "prompt"),
        chosen=chosen,
        rejected=rejected,
        rejected_description=describe(_level(row, rejected_level))
        if row.get(rejected_level) is not None
        else None,
        metadata=_extras(row, ("prompt", "response_x", "response_y", "scorer_level")),
    )
    return _Converted(pref, describe(user))


def _describe_review(level: str) -> str | None:
    if level in REVIEW_DESCRIPTIONS:
        return REVIEW_DESCRIPTIONS[level]
    # Unknown combinations still get a description in the same style rather than none.
    parts = [p.strip() for p in level.split("+") if p.strip()]
    return f"This user prefers {' and '.join(parts)} reviews." if parts else None


def _describe_elix(level: str) -> str:
    return f"The user is {level}."


def _check_columns(path: str | Path, fmt: SourceFormat, row: dict[str, Any]) -> None:
    """A file of another layout fails once, by name, rather than once per row."""
    needed = ROLEPLAY_COLUMNS[:4] if fmt is SourceFormat.ROLEPLAY else PAIR_COLUMNS
    missing = [c for c in needed if c not in row]
    if missing:
        raise DataError(
            f"{path}: not a {fmt.value} file: missing columns {', '.join(missing)} "
            f"(found: {', '.join(row) or 'none'}); the {fmt.value} format needs {', '.join(needed)}"
        )


def _source_format(fmt: SourceFormat | str) -> SourceFormat:
    try:
        return SourceFormat(fmt)
    except ValueError:
        choices = ", ".join(f.value for f in SourceFormat)
        raise UserError(f"unknown dataset format {fmt!r}; expected one of {choices}") from None


_Converter = Callable[[dict[str, Any]], _Converted | None]


def _converter(fmt: SourceFormat, scorer_match: bool) -> _Converter:
    """The row converter of `fmt`; None from it means the official ELIX filter left the row out."""
    if fmt is SourceFormat.ROLEPLAY:
        return _convert_roleplay
    describe = _describe_review if fmt is SourceFormat.REVIEW else _describe_elix

    def convert(row: dict[str, Any]) -> _Converted | None:
        if fmt is SourceFormat.ELIX and scorer_match:
            scorer = _level(row, "scorer_level")
            levels = {_level(row, c) for c in ("level_x", "level_y") if row.get(c) is not None}
            if scorer not in levels:
                return None
        return _convert_pair(row, describe)

    return convert


def _convert_row(where: str, row: Any, convert: _Converter, problems: list[str]) -> _Converted | None:
    """`convert(row)`, or None with the row's problems appended to `problems` as 'where: column: ...'."""
    try:
        if not isinstance(row, dict):
            raise _RowError("record", f"expected a JSON object, got {type(row).__name__}")
        return convert(row)
    except _RowError as err:
        problems.append(f"{where}: {err.column}: {err}")
    except ValidationError as err:
        problems.extend(format_validation_error(where, err))
    return None


@dataclass
class _Personas:
    """Each user's description, from the first row that names the user; later rows that carry another
    one are counted, to be reported, never applied."""

    descriptions: dict[str, str | None] = field(default_factory=dict)
    first_row: dict[str, str] = field(default_factory=dict)
    conflicts: Counter[str] = field(default_factory=Counter)

    def add(self, uid: str, description: str | None, where: str) -> None:
        if uid not in self.descriptions:
            self.descriptions[uid] = description
            self.first_row[uid] = where
        elif description and self.descriptions[uid] != description:
            self.conflicts[uid] += 1

    def notes(self) -> list[str]:
        return [
            f"user {uid!r}: {n} rows carry a persona different from the one at {self.first_row[uid]}; "
            "kept the first"
            for uid, n in sorted(self.conflicts.items())
        ]

    def users(self, fmt: SourceFormat) -> list[User]:
        users = []
        for uid, description in self.descriptions.items():
            metadata: dict[str, Any] = {"source": fmt.value}
            if fmt is SourceFormat.REVIEW:
                # The paper trains on the 4 base review users and evaluates on the interpolated ones.
                metadata["split"] = "test" if "+" in uid else "train"
            users.append(User(user_id=uid, description=description, metadata=metadata))
        return users


def import_released(path: str | Path, fmt: SourceFormat | str, scorer_match: bool = True) -> ImportResult:
    """Read a released FSPO dataset file (`fmt`: roleplay, review or elix) into records.

    Raises `DataError` listing every bad row as 'file:row: column: message'. `scorer_match`
    (ELIX only) applies the official filter: keep rows whose `scorer_level` equals `level_x` or
    `level_y`; the number of rows it removed is in the result's `notes`.
    """
    fmt = _source_format(fmt)
    convert = _converter(fmt, scorer_match)
    problems: list[str] = []  # iter_rows appends lines it cannot parse; _convert_row appends bad cells
    row_problem_lines = 0
    result = ImportResult([], [])
    personas = _Personas()
    for where, row in iter_rows(path, problems):
        result.rows += 1
        if result.rows == 1 and isinstance(row, dict):
            _check_columns(path, fmt, row)
        before = len(problems)
        converted = _convert_row(where, row, convert, problems)
        row_problem_lines += len(problems) - before
        if len(problems) > before:
            continue
        if converted is None:
            result.filtered += 1
            continue
        result.preferences.append(converted.preference)
        personas.add(converted.preference.user_id, converted.description, where)
    result.rows += len(problems) - row_problem_lines  # lines too broken to parse are rows too
    if problems:
        raise DataError(f"{path}: {len(problems)} problems in the {fmt.value} file", problems)
    if result.rows == 0:
        raise DataError(f"{path}: the file holds no rows")
    if not result.preferences:
        raise DataError(
            f"{path}: every one of {result.rows} rows was filtered out (scorer_match); nothing to import"
        )
    if result.filtered:
        result.notes.append(
            f"{result.filtered} of {result.rows} rows left out by the official ELIX filter "
            "(scorer_level is neither level_x nor level_y); "
            "pass scorer_match=False / --no-scorer-match to keep them"
        )
    result.notes += personas.notes()
    result.users = personas.users(fmt)
    return result
