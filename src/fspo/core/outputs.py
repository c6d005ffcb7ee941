"""One output policy for every command that writes an `--out`.

A command never replaces or mixes into another run's outputs without being told to. Each output
folder carries a run record, ``fspo_run.json``: the command, its settings and their fingerprint, and
whether the run finished. Before any work, `OutputFolder` compares it with the run about to start:

- an empty or new folder, or one holding only files this command does not write: the run starts;
- the same command with the same settings: the run continues (a command that resumes picks up what a
  stopped run left; one that does not simply writes the same outputs again);
- anything else (other settings, another command, or files this command writes but no record of a
  run): refused with a `UserError` that names the folder and the settings that differ, unless
  ``--overwrite`` is given. Then the previous run's outputs are removed first (or, for a command
  whose stages are cached by their own fingerprints, left to that cache, which re-runs exactly the
  stages whose settings changed). Files the command does not write are never touched.

While a run writes, its record says ``running``; readers of the folder (`require_finished`) refuse a
folder whose run did not finish, naming the command to rerun, so a half-written folder (Ctrl-C or a
kill between two files) is never read as data. A command that cannot resume removes what it wrote
when it is interrupted, leaving the folder as it found it (less the outputs `--overwrite` replaced).

One writer at a time: `writing` holds an exclusive `flock` on the folder itself (no lock file to leave
behind or to go stale: the kernel drops the lock when its process dies, even by `kill -9`, so the next
run simply takes it). A second writer is refused at once, naming the holder's pid and command line,
which the running record carries. Under the lock the record is read again: a run that wrote the folder
between this one's check and its start is a refusal too, never a mix.

When the machine refuses a write (a full disk, a read-only mount, a symlink loop, the folder removed),
the run fails with one `WriteError` line naming the path and the cause, then says what it left: nothing
(a command that cannot resume), or a partial run that the hinted command continues. A finished run's
files have the mode the umask gives (a library that makes its files 0600, like safetensors, included).

File outputs (`claim_file`) follow the same rule: an existing file is replaced only with
``--overwrite``; a command that resumes into its file (generation) checks the settings itself.

Why hand-written: the rule is fspo's own (what counts as "the same run"); the pieces are atomic writes.
The lock is a bare `fcntl.flock` rather than the `filelock` package: that one locks a separate lock
file, which would sit among the outputs, and says nothing of who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError, WriteError, write_error
from fspo.core.files import apply_umask, atomic_write_json
from fspo.core.stages import fingerprint

RUN_FILE = "fspo_run.json"

#: What each run interrupted by Ctrl-C left and what to rerun, for the CLI to say after "Aborted!".
interrupted: list[str] = []


def read_record(folder: Path) -> dict[str, Any] | None:
    """The run record of `folder`, None if it has none; a damaged record is a `UserError`."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(
            f"{path}: not a readable run record ({err}); delete it if the folder is yours"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("command"), str):
        raise UserError(f"{path}: not a run record (no 'command'); delete it if the folder is yours")
    return record


def require_finished(folder: str | Path) -> None:
    """Refuse to read a folder whose run was interrupted (its record says it is still running)."""
    record = read_record(Path(folder))
    if record is not None and record.get("state") != "finished":
        raise UserError(
            f"{folder}: the `fspo {record['command']}` that writes it did not finish (interrupted); "
            f"rerun that command{_with(record.get('resume_option'))} to complete it"
        )


def _with(resume_option: str | None) -> str:
    """What to add to a stopped run's command to continue it: its resume option, if it has one."""
    return f" with {resume_option}" if resume_option else ""


def command_line() -> str:
    """This process's command line, as the user typed it when it is the `fspo` command."""
    first = sys.argv[0] if sys.argv else ""
    if first in ("-c", "-m") or Path(first).name in ("fspo", "__main__.py"):
        return shlex.join(["fspo", *sys.argv[1:]])
    return shlex.join(sys.argv)


def _differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [
        f"{k}: {json.dumps(old.get(k), default=str)} -> {json.dumps(new.get(k), default=str)}"
        for k in keys
        if old.get(k) != new.get(k)
    ]
    more = f", and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


class OutputFolder:
    """The `--out` folder of one run of `command` with `params` (JSON-able settings).

    `owns` names the files and folders the command writes in it (globs allowed, e.g.
    ``checkpoints``); only those are ever removed. `resumable`: the command continues a stopped run
    of the same settings, so an interrupted run keeps its outputs; otherwise they are removed.
    `resume_option`: the option a resumable command needs to continue (e.g. ``--resume``), named in
    every hint to rerun. `cached_stages`: the command's own stage cache decides what to redo, so
    `--overwrite` removes nothing up front. `replaces_folder`: the command puts a whole new folder in
    place of this one (`model init` renames a finished model folder into place); otherwise a folder
    removed or replaced while the run wrote is a fault, since the run's outputs are no longer together.
    Construct it before any long work: the refusal comes first.
    """

    def __init__(
        self,
        path: str | Path,
        command: str,
        params: dict[str, Any],
        owns: Iterable[str],
        *,
        overwrite: bool = False,
        resumable: bool = False,
        resume_option: str | None = None,
        cached_stages: bool = False,
        replaces_folder: bool = False,
    ):
        self.path = Path(path)
        self.command = command
        self.params = json.loads(json.dumps(params, default=str))  # as it will read back from the record
        self.fingerprint = fingerprint(self.params)
        self.owns = tuple(owns)
        self.resumable = resumable
        self.resume_option = resume_option if resumable else None
        self.cached_stages = cached_stages
        self.replaces_folder = replaces_folder
        self.replace = False  # set when --overwrite meets another run's outputs
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file; this command writes a folder")
        previous = read_record(self.path) if self.path.is_dir() else None
        self.previous = previous  # the record found, whatever run made it (None: no record)
        self.continues = previous is not None and self._same(previous)
        if self.continues:
            self.replace = overwrite  # asked to start over: this run's own outputs go too
            return
        what = self._other_run(previous)
        if what is None:
            return
        if not overwrite:
            raise UserError(
                f"--out {self.path} holds {what}; pass --overwrite to replace its outputs, "
                "or choose another --out"
            )
        self.replace = True

    @property
    def finished(self) -> bool:
        """Whether the folder holds this very run (same command and settings), finished."""
        return self.continues and (self.previous or {}).get("state") == "finished"

    def _same(self, record: dict[str, Any]) -> bool:
        return record.get("command") == self.command and record.get("fingerprint") == self.fingerprint

    def _owned(self) -> list[Path]:
        """The command's outputs in the folder (the run record aside: it is kept apart)."""
        if not self.path.is_dir():
            return []
        found = {p for pattern in self.owns for p in self.path.glob(pattern) if p.name != RUN_FILE}
        return sorted(found)

    def _other_run(self, previous: dict[str, Any] | None) -> str | None:
        """What in the folder belongs to another run, said for the refusal; None if nothing does."""
        if previous is not None:
            if previous.get("command") != self.command:
                return f"the outputs of `fspo {previous['command']}`"
            return (
                f"the outputs of a `fspo {self.command}` run with other settings "
                f"({_differences(previous.get('params') or {}, self.params)})"
            )
        owned = self._owned()
        if owned:
            names = ", ".join(p.name for p in owned[:4]) + (", ..." if len(owned) > 4 else "")
            return f"{names} from a run fspo has no record of"
        return None

    def _clear(self) -> None:
        for path in self._owned():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _record(self, state: str) -> None:
        """Write the run record. While running it also names the process that writes (for a second
        writer's refusal) and how to continue it; a finished record holds only what the run was, so
        the same run made twice leaves the same bytes. The folder is never made anew here: one removed
        while the run wrote is a `WriteError`, not an empty folder marked finished."""
        record: dict[str, Any] = {
            "command": self.command,
            "fingerprint": self.fingerprint,
            "state": state,
            "params": self.params,
        }
        if state == "running":
            record |= {"pid": os.getpid(), "command_line": command_line()}
            if self.resume_option:
                record["resume_option"] = self.resume_option
        atomic_write_json(self.path / RUN_FILE, record, make_parents=False)

    def _lock(self) -> int | None:
        """Hold an exclusive lock on the folder (its fd, None where the file system has no locks), or
        refuse: another process writes it. The folder must exist."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(
                    f"--out {self.path} {self._holder()}; wait for it to finish, or choose another --out"
                ) from None
            return None  # a file system without flock (some network mounts): run unlocked, as before
        return fd

    def _holder(self) -> str:
        """Who holds the folder's lock, from its running record (written just after the lock is taken)."""
        with contextlib.suppress(UserError, OSError):
            record = read_record(self.path) or {}
            if record.get("state") == "running" and "pid" in record:
                return (
                    f"is being written by another `fspo {record['command']}` (pid {record['pid']}: "
                    f"{record.get('command_line', '?')})"
                )
        return "is being written by another fspo process"

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Wrap the work a command does before `writing` (reading, simulating): a Ctrl-C there is
        noted as what it is, a run that wrote nothing."""
        try:
            yield
        except KeyboardInterrupt:
            interrupted.append(
                f"`fspo {self.command}` stopped before writing anything in {self.path}; "
                "rerun it to start again"
            )
            raise

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """Take the folder's lock, mark the run started (then let `--overwrite` clear the old outputs),
        yield the folder, and mark it finished when the body returns. If the body fails, a command that
        cannot resume removes what it wrote; one that can leaves it, marked running, for the same
        command to continue. A write the machine refuses is one `WriteError` saying which of the two."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = self._lock()
        except OSError as err:
            raise write_error(err, self.path) or err from None
        try:
            if read_record(self.path) != self.previous:
                raise UserError(
                    f"--out {self.path} was written by another run while this one started; "
                    "run the command again to check it afresh"
                )
            self._start(created)
            try:
                if (self.replace and not self.cached_stages) or self._stale():
                    self._clear()
                yield self.path
                self._check_in_place(lock)
            except BaseException as err:
                fault = self._failed(err, created)
                if fault is err:
                    raise
                raise fault from None
            self._finish()
        finally:
            if lock is not None:
                os.close(lock)

    def _stale(self) -> bool:
        """Whether the folder holds what a run of a command that cannot resume left when it was killed
        (its record still says running): partial outputs, worth nothing, that must not mix in."""
        stopped = self.continues and (self.previous or {}).get("state") != "finished"
        return stopped and not self.resumable and not self.cached_stages

    def _start(self, created: bool) -> None:
        """Mark the run started; if even that cannot be written, leave no folder made for it."""
        try:
            self._record("running")
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise

    def _check_in_place(self, lock: int | None) -> None:
        """Refuse to mark finished a folder that is not the one the run started in (removed, and made
        anew by a later write): the outputs written before are gone with the old one."""
        if lock is None or self.replaces_folder:
            return
        held = os.fstat(lock)
        try:
            now = os.stat(self.path)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise WriteError(self.path, "the folder was removed while the run wrote into it")

    def _finish(self) -> None:
        with contextlib.suppress(OSError):  # a mode it may not change (another owner's file) is no failure
            apply_umask(self._owned())
        try:
            self._record("finished")
        except WriteError as err:
            raise err.with_note(self._left()) from None

    def _failed(self, err: BaseException, created: bool) -> BaseException:
        """Clean up after the body failed with `err`, note what was left, and return what to raise."""
        if not self.resumable or (not self.continues and not self._owned()):
            # Nothing to continue from (or a command that cannot): leave the folder as found. Best
            # effort: on a read-only or vanished folder there is nothing more to remove.
            with contextlib.suppress(OSError):
                self._clear()
                (self.path / RUN_FILE).unlink(missing_ok=True)
                if created and not any(self.path.iterdir()):
                    self.path.rmdir()
        if isinstance(err, KeyboardInterrupt):
            interrupted.append(self._left())
            return err
        fault = err if isinstance(err, WriteError) else write_error(err, self._fault_path(err))
        if fault is None:
            return err
        return WriteError(fault.path or self.path, fault.cause, self._left())

    def _fault_path(self, err: BaseException) -> Path | None:
        """The path to name for a failed write: the file an `OSError` names, else the folder."""
        return None if isinstance(err, OSError) and err.filename is not None else self.path

    def _left(self) -> str:
        """What a stopped run left in the folder and what to rerun, for the user."""
        record = self.path / RUN_FILE
        if self.resumable and record.is_file():
            return (
                f"{self.path} holds a partial `fspo {self.command}` run; "
                f"rerun the same command{_with(self.resume_option)} to continue it"
            )
        return f"`fspo {self.command}` left no outputs in {self.path}; rerun it to write them"


def claim_file(
    path: str | Path, option: str = "--out", overwrite: bool = False, resumes: bool = False
) -> Path:
    """The same rule for a single output file, checked before any work: an existing file is replaced
    only with `overwrite` (a command that `resumes` into its file checks its settings itself), and a
    path that cannot be written is refused now rather than after hours of scoring: a folder where a
    file is meant, a parent that is a file, a place nobody may write (e.g. /proc). Writability is
    tried with a temporary file in the nearest existing folder, since `os.access` says yes to root."""
    path = Path(path)
    try:
        os.stat(path.parent)  # a symlink loop on the way reads as "missing" to `exists` below
    except FileNotFoundError:
        pass
    except OSError as err:
        raise write_error(err, path) or err from None
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file path (e.g. {path / 'result.json'})")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"{option} {path}: cannot write in {folder} ({err.strerror})") from None
    if path.exists() and not overwrite and not resumes:
        raise UserError(
            f"{option} {path} exists (an earlier result); pass --overwrite to replace it, "
            f"or choose another {option}"
        )
    return path
