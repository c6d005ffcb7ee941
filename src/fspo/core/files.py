"""Atomic writes and crash-safe append logs, used by every stage that writes files; and the one reader
of a config file's fields (YAML or JSON).

Why hand-written: the stdlib gives the pieces (`os.replace`, `fsync`) but not the policy. A reader
must never see a half-written output file, and an append log killed mid-line (even by `kill -9`)
must be readable afterwards: a torn last line is dropped on open and its work redone, never half-kept.
When the machine refuses a write (a full disk, a read-only mount, a symlink loop, a folder removed
underneath), the writer leaves nothing half-written either (no temporary file, no partial line) and
raises a `WriteError` naming the file it was writing, never the temporary one.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol

from fspo.core.errors import DataError, UserError, write_error


def _fault(err: OSError, path: Path) -> BaseException:
    """`err` met while writing `path`: a `WriteError` naming `path` if it is the machine's fault (an
    error about another file keeps that file's name), else `err` itself."""
    about_path = err.filename is None or Path(err.filename).parent == path.parent
    return write_error(err, path if about_path else None) or err


def umask() -> int:
    """The process umask, read without changing it (`os.umask` can only be read by setting it, which
    would race with another thread creating a file); from /proc where there is one."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(paths: Iterable[Path]) -> None:
    """Give the files under `paths` that a library made private (0600: safetensors writes its files so,
    whatever the umask) the mode any other tool gives a new file: 0666 less the umask."""
    mode = 0o666 & ~umask()
    for root in paths:
        files = [root] if not root.is_dir() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and mode != 0o600:
                path.chmod(mode)


@contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", encoding: str | None = "utf-8", make_parents: bool = True
) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    The file gets the mode any tool would give it (0666 less the umask): `mkstemp` makes it 0600, which
    the rename would otherwise carry over. `make_parents`: create missing folders on the way; without
    it, a folder removed since the writer made it is a `WriteError` rather than silently made anew.
    """
    path = Path(path)
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _fault(err, path) from None
    with contextlib.suppress(OSError):  # a file system without modes (FAT, some network mounts) keeps its own
        os.fchmod(fd, 0o666 & ~umask())
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # the folder may be gone or read-only by now
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _fault(err, path) from None
        raise


def atomic_write_text(path: str | Path, text: str, make_parents: bool = True) -> None:
    with atomic_open(path, make_parents=make_parents) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any, make_parents: bool = True) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"
    atomic_write_text(path, text, make_parents=make_parents)


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
    holds only whole records. `append` writes one line (fsync every `sync_every`); a line the machine
    refuses to finish (a full disk) is cut off again at once and raised as a `WriteError`.
    """

    def __init__(self, path: str | Path, sync_every: int = 1):
        self.path = Path(path)
        self._sync_every = max(1, sync_every)
        self._pending = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair()
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as err:
            raise _fault(err, self.path) from None

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
        if self._fd is None:
            raise ValueError(f"{self.path}: append to a closed log")
        line = memoryview((json.dumps(record, ensure_ascii=False, default=str) + "\n").encode())
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while line:  # os.write may write part of the line (a disk filling up): write the rest
                line = line[os.write(self._fd, line) :]
            self._pending += 1
            if self._pending >= self._sync_every:
                os.fsync(self._fd)
                self._pending = 0
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)  # the log keeps whole records only
            raise _fault(err, self.path) from None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        except OSError as err:
            raise _fault(err, self.path) from None
        finally:
            os.close(fd)

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
