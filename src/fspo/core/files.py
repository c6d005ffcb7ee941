"""Atomic writes and crash-safe append logs, used by every stage that writes files; and the one reader
of a config file's fields (YAML or JSON).

Why hand-written: the stdlib gives the pieces (`os.replace`, `fsync`) but not the policy. A reader
must never see a half-written output file, and an append log killed mid-line (even by `kill -9`)
must be readable afterwards: a torn last line is dropped on open and its work redone, never half-kept.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol

from fspo.core.errors import DataError, UserError


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


class AppendLog:
    """A JSONL file that only grows, one complete line per record, safe against kills.

    On open, a torn final line (no trailing newline, or not valid JSON) is cut off, so the log
    holds only whole records. `append` writes one line and flushes it (fsync every `sync_every`).
    """

    def __init__(self, path: str | Path, sync_every: int = 1):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._sync_every = max(1, sync_every)
        self._pending = 0

    def _repair(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data:
                return
            keep = len(data)
            if not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
            else:
                last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
                try:
                    json.loads(data[last_start:])
                except ValueError:
                    keep = last_start
            if keep != len(data):
                f.truncate(keep)

    def read(self) -> Iterator[Any]:
        """Every whole record, in order (streamed: works for logs larger than memory)."""
        for _, record in json_lines(self.path):
            yield record

    def append(self, record: Any) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._f.flush()
        self._pending += 1
        if self._pending >= self._sync_every:
            os.fsync(self._f.fileno())
            self._pending = 0

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def json_lines(path: str | Path, remedy: str = "fix or remove the line") -> Iterator[tuple[str, Any]]:
    """``('file:line', record)`` for each non-blank line of a JSON-lines file fspo wrote (an append log,
    a generation file), streamed. A line that is not JSON was damaged after it was written (a kill
    tears only the last line of an `AppendLog`, which it cuts on open): a `DataError` naming its line
    and column, and `remedy`, what the user can do about it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{n}: column {err.colno}: not valid JSON ({err.msg}); {remedy}"
                ) from None
            yield f"{path}:{n}", record


class _TextFile(Protocol):  # a `Path`, or a packaged file (`importlib.resources` `Traversable`)
    name: str

    def read_text(self, encoding: str | None = None) -> str: ...


def read_fields(file: str | Path | _TextFile) -> dict[str, Any]:
    """A config file's object of fields: YAML by extension (.yaml, .yml), otherwise JSON.

    Every problem is a `UserError` naming the file: unreadable, not valid YAML/JSON, or not a mapping.
    """
    file = Path(file) if isinstance(file, str) else file
    suffix = Path(file.name).suffix
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {str(file)!r}: {err}") from None
    try:
        if suffix in {".yaml", ".yml"}:
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the user's file
        kind = {".yaml": "YAML", ".yml": "YAML"}.get(suffix, "JSON")
        raise UserError(f"config file {str(file)!r} is not valid {kind}: {err}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {str(file)!r} must hold an object of fields")
    return values
