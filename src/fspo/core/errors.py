"""User-facing errors.

A `UserError` is a mistake in the user's input (a file, a config field, a model id): the CLI prints
its message as one line and exits with status 2, without a traceback. Everything else is a bug and
keeps its traceback.

A `WriteError` is the machine refusing a write (a full disk, a read-only mount, a symlink loop, a folder
removed while fspo wrote into it): nothing the code can fix, so it is said like a `UserError`, in one
line naming the path and the cause. `write_error` is the one place an `OSError` becomes one.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """Bad input from the user; the message must say what is wrong and where (file, line, field)."""


class DataError(UserError):
    """A data file has bad records. `problems` lists every one as 'file:line: field: message'."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or []
        shown = "\n".join(f"  {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(message + (f"\n{shown}{more}" if self.problems else ""))


class WriteError(UserError):
    """`path` could not be written because of `cause` (the environment's fault, not the code's).

    `note` says what the failed run left behind and what to run next; the writer that knows it (the
    `--out` folder's `OutputFolder`) adds it with `with_note`."""

    def __init__(self, path: str | os.PathLike[str] | None, cause: str, note: str = ""):
        self.path = None if path is None else str(path)
        self.cause = cause
        self.note = note
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{cause}" + (f"; {note}" if note else ""))

    def with_note(self, note: str) -> WriteError:
        return WriteError(self.path, self.cause, note)


# The errors a working program gets from a misbehaving machine, said the same way whatever wrote.
_CAUSES = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ELOOP: "the path runs into a loop of symbolic links",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EIO: "input/output error (a failing disk or a lost network mount)",
}
# Of those, the ones that say nothing about a path the user gave: a fault even with no file named.
_MACHINE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def write_error(err: BaseException, path: str | os.PathLike[str] | None = None) -> WriteError | None:
    """`err` as a `WriteError` naming `path` (default: the file the OS named), or None when `err` is not
    the machine's fault (another errno, or a path-less error about no path: a bug keeps its traceback).

    A missing file where fspo writes means a folder was removed under it: said so, naming the folder.
    Libraries that write files their own way say the same faults in their own exceptions: a Rust one
    (safetensors, tokenizers) as '... (os error 28)', torch's zip writer only as 'unexpected pos', so
    an exception that is not an `OSError` is the disk's fault when it names an errno, or when it comes
    while the disk under `path` has no space left."""
    if isinstance(err, UserError | KeyboardInterrupt) or not isinstance(err, Exception):
        return None
    if not isinstance(err, OSError):
        named = _OS_ERROR_IN_TEXT.search(str(err))
        if named:
            code = int(named[1])
            return write_error(OSError(code, os.strerror(code)), path)
        return WriteError(path, _CAUSES[errno.ENOSPC]) if path is not None and _disk_full(path) else None
    if err.errno not in _CAUSES:
        return None
    named_files = [str(f) for f in (err.filename, err.filename2) if f is not None]
    where = str(path) if path is not None else " -> ".join(named_files) or None
    if where is None and err.errno not in _MACHINE:
        return None
    cause = _CAUSES[err.errno]
    if err.errno == errno.ENOENT and path is not None and not Path(path).parent.is_dir():
        cause = f"its folder {Path(path).parent} no longer exists (removed while fspo wrote into it?)"
    return WriteError(where, cause)


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def _disk_full(path: str | os.PathLike[str]) -> bool:
    try:
        return os.statvfs(path).f_bavail == 0
    except OSError:
        return False
