"""Reading and writing record files: JSONL/JSON and Parquet, validated at the boundary.

Every stage reads its inputs through `read_records`/`iter_records` and writes through
`write_records`, so a bad record is caught where it enters, named by 'file:line: field: message',
and an output file is either complete or absent (atomic writes from `fspo.core.files`).

Why the pieces:
  * JSONL is parsed here, line by line in binary mode, because `datasets`' JSON loader reports
    neither the line of broken JSON nor of non-UTF-8 bytes; we need both in the message.
  * Parquet and CSV go through `datasets` (Arrow) as everywhere else in the project. Parquet needs
    fixed column types, so the free-form parts of a record (`metadata`, an episode's `shots` and
    `query`) are stored as JSON text columns: metadata dicts with varying keys then round-trip
    exactly. On reading, such a column is accepted either as JSON text or as a native struct.
  * Invalid rows are never dropped silently: by default every problem is collected and raised as
    one `DataError`; with ``skip_invalid=True`` they are skipped and listed in a `ReadReport`.
  * An error suggests only the options its command has: a caller that offers ``--skip-invalid`` or
    ``--on-duplicate`` passes its value (False, "error"); the default None reads the same without the
    option and never suggests it.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fspo.core.errors import DataError, UserError
from fspo.core.files import atomic_open
from fspo.core.outputs import require_finished
from fspo.data.schema import Episode, Preference, User

R = TypeVar("R", Preference, User, Episode)

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
CSV_SUFFIXES = (".csv",)
RECORD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES

# Fields that are not plain text: stored as JSON text columns in Parquet.
_JSON_FIELDS: dict[type[BaseModel], tuple[str, ...]] = {
    Preference: ("metadata",),
    User: ("metadata",),
    Episode: ("shots", "query", "metadata"),
}


@dataclass
class ReadReport:
    """What reading a file found: how many rows, how many were valid, and every problem."""

    path: str
    total: int = 0
    valid: int = 0
    problems: list[str] = field(default_factory=list)
    # Valid records left out as duplicates of another record of the same file (`read_dataset_dir`'s
    # --on-duplicate policy), one 'file:line: ...; kept line N' note each. Not counted in `skipped`.
    dropped: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.total - self.valid

    def summary(self) -> str:
        text = f"{self.path}: {self.valid} valid of {self.total} records"
        if self.skipped:
            text += f", {self.skipped} skipped:\n" + "\n".join(f"  {p}" for p in self.problems[:20])
            if len(self.problems) > 20:
                text += f"\n  ... and {len(self.problems) - 20} more"
        return text


def format_validation_error(where: str, err: ValidationError) -> list[str]:
    """One 'where: field: message' line per pydantic error; a record-level error has field 'record'."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "record"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {loc}: {msg}")
    return lines


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' progress bars for small files, restoring the user's setting afterwards."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects that are all kept.

    CPython's collector rescans the ever-growing heap as millions of small objects pile up; on
    150k episodes that made reading 4x slower (24 s vs 6 s). Records hold no reference cycles,
    so nothing is leaked; the previous state is restored afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")


def iter_rows(path: str | Path, problems: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every row of a JSONL/JSON, Parquet or CSV file.

    `where` is 'file:line' for JSONL and 'file:row N' (1-based) for the columnar formats. Rows that
    cannot even be parsed (broken JSON, non-UTF-8 bytes) are appended to `problems` if given, else
    raised at once. Rows are whatever the file holds: callers validate them.
    """
    path = Path(path)
    _check_exists(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_json_rows(path, problems)
    elif suffix in PARQUET_SUFFIXES + CSV_SUFFIXES:
        yield from _iter_columnar_rows(path)
    else:
        raise UserError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .parquet or .csv")


def _iter_json_rows(path: Path, problems: list[str] | None) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        # A whole-file JSON array is accepted too: a common export format.
        data = path.read_bytes()
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            start = data.rfind(b"\n", 0, err.start) + 1
            column = _char_column(data[start:], err.start - start)
            raise DataError(
                f"{path}:{line}: column {column}: not UTF-8 text (byte {data[err.start]:#04x}); "
                "save the file as UTF-8"
            ) from None
        except json.JSONDecodeError as err:
            # The whole file is one JSON value here, so the decoder's line and column are the file's.
            raise DataError(f"{path}:{err.lineno}: column {err.colno}: broken JSON: {err.msg}") from None
        for i, item in enumerate(items, start=1):
            yield f"{path}:record {i}", item
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
                if lineno == 1:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    continue  # blank lines separate nothing and hold no record
                row = json.loads(text)
            except UnicodeDecodeError as err:
                column = _char_column(raw, err.start)
                problem = f"{where}: record: not valid UTF-8 (byte {raw[err.start]:#04x} at column {column})"
            except json.JSONDecodeError as err:
                problem = f"{where}: record: broken JSON: {err.msg} (column {err.colno})"
            else:
                yield where, row
                continue
            if problems is None:
                raise DataError(f"{path}: bad record", [problem])
            problems.append(problem)


def _iter_columnar_rows(path: Path) -> Iterator[tuple[str, Any]]:
    from datasets import Dataset

    if path.suffix.lower() in CSV_SUFFIXES:
        _check_utf8(path)
    with _quiet_datasets():
        try:
            if path.suffix.lower() in PARQUET_SUFFIXES:
                if _parquet_num_rows(path) == 0:
                    return  # `datasets` fails on an empty table; the caller reports "no records"
                ds = Dataset.from_parquet(str(path), keep_in_memory=True)
            else:
                ds = Dataset.from_csv(str(path), keep_in_memory=True)
        except Exception as err:  # pyarrow/pandas raise many types for a corrupt file
            raise DataError(f"{path}: cannot read the file: {type(err).__name__}: {err}") from None
    for i, row in enumerate(ds, start=1):
        yield f"{path}:row {i}", {k: _none_if_nan(v) for k, v in row.items()}


def _char_column(line: bytes, start: int) -> int:
    """The 1-based column, in characters (what an editor shows), of byte `start` of a line."""
    return len(line[:start].decode("utf-8", errors="replace")) + 1


def _check_utf8(path: Path) -> None:
    """Raise a `DataError` naming the first line of a text file that is not UTF-8 (a CSV exported as
    Latin-1 or Windows-1252, say): the CSV reader would only say that generating the dataset failed.
    Line by line is exact, since a newline byte never occurs inside a UTF-8 multi-byte character."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                    f"{_char_column(raw, err.start)}); "
                    "save the file as UTF-8 (it may be a Latin-1 or Windows-1252 export)"
                ) from None


def _parquet_num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _none_if_nan(value: Any) -> Any:
    # CSV readers turn empty cells into NaN; for us an empty cell is a missing value.
    return None if isinstance(value, float) and math.isnan(value) else value


def _decode_json_fields(kind: type[BaseModel], row: dict[str, Any], where: str) -> dict[str, Any] | str:
    """Parquet stores the structured fields as JSON text; turn them back into objects."""
    out = dict(row)
    for name in _JSON_FIELDS.get(kind, ()):
        value = out.get(name)
        if isinstance(value, str):
            try:
                out[name] = json.loads(value)
            except json.JSONDecodeError as err:
                return f"{where}: {name}: not valid JSON text: {err.msg} (column {err.colno})"
        elif value is None and name == "metadata":
            out.pop(name)  # a missing metadata cell means no metadata
    return out


def iter_records(
    path: str | Path,
    kind: type[R],
    skip_invalid: bool | None = None,
    report: ReadReport | None = None,
    allow_empty: bool = False,
) -> Iterator[R]:
    """Stream validated records of type `kind` from `path`.

    Valid records are yielded as they are read. Invalid ones are collected; at the end of the
    file they are raised as one `DataError` listing each as 'file:line: field: message' (so write
    outputs atomically: a consumer has seen the good records by then). With ``skip_invalid=True``
    they are only recorded in `report` (pass one to see them). An empty file is an error unless
    `allow_empty` (e.g. a users file of a data set without user records).
    """
    for _, record in iter_located(path, kind, skip_invalid, report, allow_empty):
        yield record


def iter_located(
    path: str | Path, kind: type[R], skip_invalid: bool | None, report: ReadReport | None, allow_empty: bool
) -> Iterator[tuple[str, R]]:
    """`iter_records`, yielding ``(where, record)``: the duplicate check and `fspo data validate` name the
    lines of what they find."""
    report = report if report is not None else ReadReport(str(path))
    report.path = str(path)
    is_columnar = Path(path).suffix.lower() in PARQUET_SUFFIXES + CSV_SUFFIXES
    parse_problems: list[str] = []
    for where, row in iter_rows(path, parse_problems):
        report.total += len(parse_problems)
        report.problems.extend(parse_problems)
        parse_problems.clear()
        report.total += 1
        if not isinstance(row, dict):
            report.problems.append(f"{where}: record: expected a JSON object, got {type(row).__name__}")
            continue
        data = _decode_json_fields(kind, row, where) if is_columnar else row
        if isinstance(data, str):
            report.problems.append(data)
            continue
        try:
            record = kind.model_validate(data)
        except ValidationError as err:
            report.problems.extend(format_validation_error(where, err))
            continue
        report.valid += 1
        yield where, record
    report.total += len(parse_problems)
    report.problems.extend(parse_problems)
    if report.total == 0 and not allow_empty:
        raise DataError(f"{path}: the file holds no records")
    if report.problems and not skip_invalid:
        bad = report.total - report.valid
        hint = "" if skip_invalid is None else ", or pass --skip-invalid to skip them with a report"
        raise DataError(
            f"{path}: {bad} of {report.total} {kind.__name__} records are invalid (fix them{hint})",
            report.problems,
        )


def read_records(
    path: str | Path,
    kind: type[R],
    skip_invalid: bool | None = None,
    report: ReadReport | None = None,
    allow_empty: bool = False,
) -> list[R]:
    """Read every record of type `kind` from a .jsonl/.json/.parquet file; see `iter_records`."""
    with gc_paused():
        return list(
            iter_records(path, kind, skip_invalid=skip_invalid, report=report, allow_empty=allow_empty)
        )


def read_records_with_report(
    path: str | Path, kind: type[R], skip_invalid: bool | None = None, allow_empty: bool = False
) -> tuple[list[R], ReadReport]:
    """`read_records` that also returns its `ReadReport` (for printing what was skipped)."""
    report = ReadReport(str(path))
    return read_records(path, kind, skip_invalid=skip_invalid, report=report, allow_empty=allow_empty), report


def record_to_row(record: BaseModel, columnar: bool = False) -> dict[str, Any]:
    """A record as a JSON-ready dict; with `columnar`, structured fields become JSON text."""
    row = record.model_dump(mode="json")
    if columnar:
        for name in _JSON_FIELDS.get(type(record), ()):
            row[name] = json.dumps(row[name], ensure_ascii=False, sort_keys=True)
    return row


def write_records(path: str | Path, records: Iterable[BaseModel], kind: type[BaseModel] | None = None) -> int:
    """Write records atomically to .jsonl/.json (one object a line) or .parquet; return the count.

    `kind` only matters for an empty Parquet file: it gives the (empty) table its columns.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        n = 0
        with atomic_open(path) as f:
            for record in records:
                # pydantic's own serializer: ~5x faster than model_dump + json.dumps on big files.
                f.write(record.model_dump_json() + "\n")
                n += 1
        return n
    if suffix in PARQUET_SUFFIXES:
        return _write_parquet(path, list(records), kind)
    raise UserError(f"{path}: cannot write {suffix!r} files; use .jsonl, .json or .parquet")


def _write_parquet(path: Path, records: list[BaseModel], kind: type[BaseModel] | None) -> int:
    from datasets import Dataset, Features, Value

    if records:
        ds = Dataset.from_list([record_to_row(r, columnar=True) for r in records])
    else:
        # A table needs at least one column to be readable; reading it back reports "no records".
        columns = list(kind.model_fields) if kind is not None else ["user_id"]
        ds = Dataset.from_dict(
            {c: [] for c in columns}, features=Features({c: Value("string") for c in columns})
        )
    with _quiet_datasets(), atomic_open(path, "wb") as f:
        ds.to_parquet(f)
    return len(records)


# --- the dataset-folder convention: preferences.jsonl + users.jsonl (Parquet accepted) ---

PREFERENCES_STEM = "preferences"
USERS_STEM = "users"


def find_data_file(folder: str | Path, stem: str, required: bool = True) -> Path | None:
    """The `stem` file of a dataset folder: ``<stem>.jsonl``, ``.json`` or ``.parquet``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"{folder}: no such data folder (expected {PREFERENCES_STEM}.jsonl and {USERS_STEM}.jsonl)"
        )
    found = [folder / f"{stem}{s}" for s in RECORD_SUFFIXES if (folder / f"{stem}{s}").exists()]
    if len(found) > 1:
        raise UserError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep only one")
    if not found:
        if required:
            raise UserError(f"{folder}: no {stem}.jsonl or {stem}.parquet in this data folder")
        return None
    return found[0]


ON_DUPLICATE = ("error", "first", "last")


def read_dataset_dir(
    folder: str | Path, skip_invalid: bool | None = None, on_duplicate: str | None = None
) -> tuple[list[Preference], list[User], list[ReadReport]]:
    """Read a data folder: its preferences (required) and users (optional), with read reports.

    Records that say the same thing twice are resolved here, where their lines are still known (see
    `resolve_duplicates`): a user id on two lines of the users file, or one user's preference on the
    same question and the same two answers (in either order) on two lines of the preferences file.
    An exact repeat keeps the first and is noted; records that differ (a swapped label, another
    description or metadata) are conflicts: with `on_duplicate` "error" (or None) they are one
    `DataError` naming both lines of each, with "first" or "last" the first or the last of each group
    is kept. Every record left out is one note in its file's `ReadReport.dropped`.
    """
    _check_policy(on_duplicate)
    require_finished(folder)  # a run stopped between its files is not data
    reports = []
    pref_path = find_data_file(folder, PREFERENCES_STEM)
    assert pref_path is not None
    prefs, conflicts, rep = _read_unique(pref_path, Preference, skip_invalid, False, on_duplicate)
    reports.append(rep)
    users: list[User] = []
    user_path = find_data_file(folder, USERS_STEM, required=False)
    if user_path is not None:
        users, more, rep = _read_unique(user_path, User, skip_invalid, True, on_duplicate)
        reports.append(rep)
        conflicts += more
    _raise_conflicts(folder, conflicts, on_duplicate)
    return prefs, users, reports


def read_unique_records(
    path: str | Path,
    kind: type[R],
    on_duplicate: str | None = None,
    skip_invalid: bool | None = None,
    allow_empty: bool = False,
) -> tuple[list[R], ReadReport]:
    """`read_records_with_report` for one preferences or users file, with `read_dataset_dir`'s
    handling of repeated records (`report.dropped` lists what was left out)."""
    _check_policy(on_duplicate)
    records, conflicts, report = _read_unique(Path(path), kind, skip_invalid, allow_empty, on_duplicate)
    _raise_conflicts(path, conflicts, on_duplicate)
    return records, report


def _check_policy(on_duplicate: str | None) -> None:
    if on_duplicate is not None and on_duplicate not in ON_DUPLICATE:
        raise UserError(f"--on-duplicate must be one of {', '.join(ON_DUPLICATE)}, got {on_duplicate!r}")


def _raise_conflicts(source: str | Path, conflicts: list[str], on_duplicate: str | None) -> None:
    if conflicts:
        hint = "" if on_duplicate is None else ", or pass --on-duplicate first|last to keep one of each"
        raise DataError(
            f"{source}: {len(conflicts)} conflicting records (the same user id, or the same user, question "
            f"and answer pair, with a different label, description or metadata); fix them{hint}",
            conflicts,
        )


def _read_unique(
    path: Path, kind: type[R], skip_invalid: bool | None, allow_empty: bool, on_duplicate: str | None
) -> tuple[list[R], list[str], ReadReport]:
    """(records without repeats, conflicts, report) of one file; see `resolve_duplicates`."""
    report = ReadReport(str(path))
    with gc_paused():  # the key tuples too: with the collector on, they cost 4x on a large file
        pairs = list(iter_located(path, kind, skip_invalid, report, allow_empty))
        records, conflicts = resolve_duplicates(
            [r for _, r in pairs], [w for w, _ in pairs], on_duplicate or "error", report
        )
    return records, conflicts, report


def _preference_key(p: Preference) -> tuple[str, ...]:
    # the same answer pair whichever answer won
    c, r = p.chosen, p.rejected
    return (p.user_id, p.question, c, r) if c < r else (p.user_id, p.question, r, c)


def _user_key(u: User) -> str:
    return u.user_id


def _label(record: Preference | User) -> str:
    if isinstance(record, Preference):
        q = record.question if len(record.question) <= 40 else record.question[:37] + "..."
        return f"user {record.user_id}, question {q!r}"
    return f"user {record.user_id}"


def _differences(kept: Preference | User, other: Preference | User) -> str:
    """What `other` says that `kept` does not ("" for an exact repeat), named by field."""
    out = []
    if isinstance(kept, Preference) and isinstance(other, Preference) and kept.chosen != other.chosen:
        out.append("chosen and rejected swapped")
    for name in ("description", "rejected_description", "metadata"):
        mine, theirs = getattr(kept, name, None), getattr(other, name, None)
        if mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            missing = object()
            keys = sorted(
                k for k in mine.keys() | theirs.keys() if mine.get(k, missing) != theirs.get(k, missing)
            )
            shown = ", ".join(f"metadata.{k}" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
            out.append(f"{shown} differ" if len(keys) > 1 else f"{shown} differs")
        else:
            out.append(f"{name} differs")
    return "; ".join(out)


def resolve_duplicates(
    records: list[R], wheres: list[str], on_duplicate: str, report: ReadReport
) -> tuple[list[R], list[str]]:
    """(records without repeats, conflict messages) for the records of one file, read at `wheres`.

    Records with the same key (user id; or user, question and unordered answer pair) form a group.
    The group's kept record takes the place of its first line, so the order of everything else is
    the same whatever the policy: the first record with "error" and "first", the last with "last"
    (for a group of exact repeats, the first).
    Each other member is one note in `report.dropped`. With "error", each member that differs from
    the first is also a conflict message 'file:line: label: conflicts with file:line (what differs)'
    (the caller raises them all at once); an exact repeat is never an error.
    """
    key = _preference_key if records and isinstance(records[0], Preference) else _user_key
    first: dict[Any, int] = {}
    repeats: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        j = first.setdefault(key(record), i)  # type: ignore[arg-type]
        if j != i:
            repeats.setdefault(j, []).append(i)
    if not repeats:
        return records, []  # the common case: one dict pass, nothing copied
    out: list[R | None] = list(records)
    conflicts = []
    prefix = f"{report.path}:"
    for j, later in repeats.items():
        group = [j, *later]
        kept = j  # an exact repeat keeps the first whatever the policy: there is nothing to choose
        if on_duplicate == "last" and any(_differences(records[j], records[m]) for m in later):
            kept = later[-1]
        kept_at = _position(wheres[kept], prefix)
        for m in group:
            if m == kept:
                continue
            what = _differences(records[kept], records[m])
            label = _label(records[m])
            if what and on_duplicate == "error":
                conflicts.append(f"{wheres[m]}: {label}: conflicts with {wheres[kept]} ({what})")
            relation = (
                f"conflicts with {kept_at} ({label}: {what})" if what else f"duplicate of {kept_at} ({label})"
            )
            report.dropped.append(f"{wheres[m]}: {relation}; kept {kept_at}")
        for m in later:
            out[m] = None
        out[j] = records[kept]  # in the first one's place
    return [r for r in out if r is not None], conflicts


def _position(where: str, prefix: str) -> str:
    """'line 7', 'row 7' or 'record 7' from a 'file:7' / 'file:row 7' / 'file:record 7' location."""
    pos = where.removeprefix(prefix)
    return f"line {pos}" if pos.isdigit() else pos


# What `write_dataset_dir` writes in a folder, in any record format (what `--overwrite` removes).
DATASET_OUTPUTS = (f"{PREFERENCES_STEM}.*", f"{USERS_STEM}.*")


def write_dataset_dir(
    folder: str | Path, preferences: Iterable[Preference], users: Iterable[User]
) -> tuple[int, int]:
    """Write a data folder (preferences.jsonl, users.jsonl) atomically; return both counts."""
    folder = Path(folder)
    n_users = write_records(folder / f"{USERS_STEM}.jsonl", users)
    n_prefs = write_records(folder / f"{PREFERENCES_STEM}.jsonl", preferences)
    return n_prefs, n_users
