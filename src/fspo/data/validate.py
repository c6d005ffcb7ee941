"""`fspo data validate`: every rule any reader of a record file applies, checked in one pass.

A file that validates is read by every stage without a refusal: beside each record's own fields
(`fspo.data.io`), that means the rules of the readers further on. `fspo data episodes` (and `fspo serve
import`) refuse one user id with two descriptions, or one preference with its label swapped
(`resolve_duplicates`); a database refuses a NUL character in a text and a non-finite number (NaN,
Infinity) in a JSON value (`storable_problems`, the one statement of that rule). Each problem is one
'file:line: field: message' line, as the readers say it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fspo.core.errors import DataError
from fspo.data.io import ReadReport, iter_located, resolve_duplicates
from fspo.data.schema import Preference, User

# JSON deeper than this is refused: no record needs it, and serializing it again (pydantic, a JSON
# column) recurses once per level, so a few hundred levels would fail only when the record is read back.
MAX_JSON_DEPTH = 32


def storable_problems(value: Any, where: str = "", depth: int = 0) -> list[str]:
    """What in `value` (a record's fields as JSON values) no database stores faithfully, one 'field:
    message' each: a NUL character in a string (PostgreSQL's text and JSON types refuse it), a lone
    surrogate (a string UTF-8 cannot encode: the record could be stored but never sent or written
    again), a non-finite float anywhere (JSON has no NaN or Infinity: a JSON column stores null, or
    fails), and containers nested deeper than `MAX_JSON_DEPTH`."""
    field = where or "record"
    if isinstance(value, str):
        return [f"{field}: {p}" for p in text_problems(value)]
    if isinstance(value, float):
        finite = math.isfinite(value)
        return [] if finite else [f"{field}: {value} is not a finite number (JSON has no NaN or Infinity)"]
    if isinstance(value, Mapping | list | tuple) and depth >= MAX_JSON_DEPTH:
        return [f"{field}: nested deeper than {MAX_JSON_DEPTH} levels"]
    problems: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            problems += storable_problems(key, where, depth + 1)
            problems += storable_problems(item, f"{where}.{key}" if where else str(key), depth + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problems += storable_problems(item, f"{where}[{i}]", depth + 1)
    return problems


def text_problems(text: str) -> list[str]:
    """Why `text` is no text a database or a tokenizer can take (a NUL, a lone surrogate), if it is not."""
    if "\x00" in text:
        return ["contains a NUL character (\\u0000), which is no text"]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return [f"contains a lone surrogate ({text[err.start]!a}), which UTF-8 cannot encode"]
    return []


def validate_file(path: str | Path, kind: type[BaseModel], skip_invalid: bool = False) -> ReadReport:
    """Check every record of `path` as `kind` with every reader's rules; the report counts the records
    that pass all of them and lists the rest (`dropped`: exact repeats, which readers keep once).

    Problems are one `DataError` naming each 'file:line: field', unless `skip_invalid`."""
    report = ReadReport(str(path))
    kept: list[tuple[str, Any]] = []
    for where, record in iter_located(path, kind, True, report, False):  # type: ignore[type-var]
        problems = storable_problems(record.model_dump(mode="python"))
        if problems:
            report.problems += [f"{where}: {p}" for p in problems]
            report.valid -= 1
        else:
            kept.append((where, record))
    if kind in (Preference, User) and kept:
        _, conflicts = resolve_duplicates([r for _, r in kept], [w for w, _ in kept], "error", report)
        report.problems += conflicts
        report.valid -= len(conflicts)
    if report.problems and not skip_invalid:
        raise DataError(
            f"{path}: {report.skipped} of {report.total} {kind.__name__} records are invalid "
            "(fix them, or pass --skip-invalid to list them without failing)",
            report.problems,
        )
    return report
