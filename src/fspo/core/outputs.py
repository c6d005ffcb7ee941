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

File outputs (`claim_file`) follow the same rule: an existing file is replaced only with
``--overwrite``; a command that resumes into its file (generation) checks the settings itself.

Why hand-written: the rule is fspo's own (what counts as "the same run"); the pieces are atomic writes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError
from fspo.core.files import atomic_write_json
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
            "rerun that command to complete it"
        )


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
    `cached_stages`: the command's own stage cache decides what to redo, so `--overwrite` removes
    nothing up front. Construct it before any long work: the refusal comes first.
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
        cached_stages: bool = False,
    ):
        self.path = Path(path)
        self.command = command
        self.params = json.loads(json.dumps(params, default=str))  # as it will read back from the record
        self.fingerprint = fingerprint(self.params)
        self.owns = tuple(owns)
        self.resumable = resumable
        self.cached_stages = cached_stages
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
        if not self.path.is_dir():
            return []
        found = {p for pattern in self.owns for p in self.path.glob(pattern)}
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
        atomic_write_json(
            self.path / RUN_FILE,
            {
                "command": self.command,
                "fingerprint": self.fingerprint,
                "state": state,
                "params": self.params,
            },
        )

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """Mark the run started (after `--overwrite` cleared the old outputs), yield the folder, and
        mark it finished when the body returns. If the body fails, a command that cannot resume
        removes what it wrote; one that can leaves it, marked running, for the same command to
        continue."""
        created = not self.path.exists()
        if self.replace and not self.cached_stages:
            self._clear()
        self.path.mkdir(parents=True, exist_ok=True)
        self._record("running")
        try:
            yield self.path
        except BaseException as err:
            if not self.resumable or (not self.continues and not self._owned()):
                # Nothing to continue from (or a command that cannot): leave the folder as found.
                self._clear()
                (self.path / RUN_FILE).unlink(missing_ok=True)
                if created and not any(self.path.iterdir()):
                    self.path.rmdir()
            if isinstance(err, KeyboardInterrupt):
                interrupted.append(
                    f"{self.path} holds a partial `fspo {self.command}` run; "
                    "rerun the same command to continue it"
                    if self.resumable
                    else f"`fspo {self.command}` left no outputs in {self.path}; rerun it to write them"
                )
            raise
        self._record("finished")


def claim_file(
    path: str | Path, option: str = "--out", overwrite: bool = False, resumes: bool = False
) -> Path:
    """The same rule for a single output file, checked before any work: an existing file is replaced
    only with `overwrite` (a command that `resumes` into its file checks its settings itself), and a
    path that cannot be written is refused now rather than after hours of scoring: a folder where a
    file is meant, a parent that is a file, a place nobody may write (e.g. /proc). Writability is
    tried with a temporary file in the nearest existing folder, since `os.access` says yes to root."""
    path = Path(path)
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
