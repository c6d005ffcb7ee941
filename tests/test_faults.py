"""When the machine misbehaves: a full disk, a read-only mount, a symlink loop, a folder removed under a
run, a second writer, a writer killed with `kill -9`, and the advice fspo gives afterwards.

Faults are injected where the OS answers (the primitives `os.fsync`, `os.write`, `os.open`, `os.mkdir`
raise what the kernel would), through the real `fspo` command: `fspo.cli.main` in this process (so the
fault can be injected), or subprocesses where two processes are the point. Each case checks the four
promises: a non-zero exit, one line naming the path and the cause and no traceback, nothing half-written
(no temporary file, no partial line, the folder as it was or a partial run marked running), and a rerun
that works once the fault is gone (the very command the message hints at).
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import CLI_ENV, FSPO_CLI, write_jsonl
from fspo.core import outputs
from fspo.core.errors import UserError, WriteError
from fspo.core.files import AppendLog, atomic_write_json, atomic_write_text, umask
from fspo.core.outputs import RUN_FILE, OutputFolder, read_record
from fspo.testing import toy_episodes, toy_users

SIM = ["sim", "run", "--users", "4", "--prefs-per-user", "3", "--seed", "0"]


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden ones too: a stray temporary file must show)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _fspo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object
) -> tuple[int, str]:
    """`fspo ARGS` through `fspo.cli.main` in this process: (exit status, stdout + stderr)."""
    from fspo.cli import main

    monkeypatch.setattr(sys, "argv", ["fspo", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    said = capsys.readouterr()
    return exit_.value.code or 0, said.out + said.err


def _one_error_line(output: str) -> str:
    """The output's only error line; there must be exactly one, and no traceback."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _full_disk(monkeypatch: pytest.MonkeyPatch, match: Callable[[str], bool]) -> None:
    """Writes to files whose path `match`es fail as on a full disk: `write` and `fsync` raise ENOSPC,
    naming no file (as the kernel does); `write` first writes half, as a disk filling up does."""
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes) -> int:
        if match(_fd_path(fd)):
            if len(data) > 1:
                return real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        if match(_fd_path(fd)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)


def _read_only(monkeypatch: pytest.MonkeyPatch, under: Path) -> None:
    """Creating or writing anything under `under` fails with EROFS, as on a read-only mount."""
    real_open, real_mkdir = os.open, os.mkdir
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def refused(path: object) -> bool:
        return str(os.path.abspath(os.fspath(path))).startswith(str(under))  # type: ignore[arg-type]

    def open_(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if flags & writes and refused(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(path, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if refused(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.fixture(autouse=True)
def _no_stale_notes():
    outputs.interrupted.clear()
    yield
    outputs.interrupted.clear()


# --- the write primitives ---


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "result.json"
    atomic_write_json(target, {"old": True})
    _full_disk(monkeypatch, lambda p: p.startswith(str(tmp_path)))
    with pytest.raises(WriteError) as err:
        atomic_write_json(target, {"new": True})
    assert str(err.value) == f"{target}: the disk is full (no space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    assert json.loads(target.read_text()) == {"old": True}


def test_append_log_on_a_full_disk_keeps_whole_records_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log.jsonl"
    with AppendLog(path) as log:
        log.append({"step": 1})
        _full_disk(monkeypatch, lambda p: p == str(path))
        with pytest.raises(WriteError, match=rf"^{re.escape(str(path))}: the disk is full"):
            log.append({"step": 2, "text": "x" * 100})  # half of it reaches the disk, then ENOSPC
        monkeypatch.undo()
        log.append({"step": 3})
    assert [r["step"] for r in AppendLog(path).read()] == [1, 3]


def test_a_library_error_on_a_full_disk_is_said_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors says '(os error 28)', torch's zip writer only 'unexpected pos': with the disk full,
    both are the disk's fault; the same error with space left is a bug and keeps its type."""

    def folder() -> OutputFolder:
        return OutputFolder(tmp_path / "run", "demo", {}, ("data.bin",), resumable=True)

    with pytest.raises(WriteError, match="the disk is full") as err, folder().writing():
        (tmp_path / "run" / "data.bin").write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "holds a partial `fspo demo` run" in str(err.value)

    class Full:
        f_bavail = 0

    torch_says = "[enforce fail at inline_container.cc:672] . unexpected pos 534080 vs 533968"
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(WriteError, match=r"run: the disk is full"), folder().writing():
        raise RuntimeError(torch_says)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"), folder().writing():
        raise RuntimeError(torch_says)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_are_made_with_the_umask(tmp_path: Path, mask: int) -> None:
    """Atomic writes (`mkstemp` makes 0600), append logs and a library's private files (safetensors
    writes 0600) all end with the mode any tool gives a new file under this umask."""
    old = os.umask(mask)
    try:
        assert umask() == mask
        atomic_write_text(tmp_path / "a.txt", "a")
        AppendLog(tmp_path / "log.jsonl").close()
        folder = OutputFolder(tmp_path / "out", "demo", {}, ("weights.bin",))
        with folder.writing():
            weights = tmp_path / "out" / "weights.bin"
            weights.write_bytes(b"w")
            weights.chmod(0o600)
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    for path in (
        tmp_path / "a.txt",
        tmp_path / "log.jsonl",
        tmp_path / "out" / "weights.bin",
        tmp_path / "out" / RUN_FILE,
    ):
        assert stat.S_IMODE(path.stat().st_mode) == want, (path.name, oct(path.stat().st_mode))


# --- the output folder ---


def test_a_folder_removed_while_the_run_writes_is_said_and_not_marked_finished(tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = OutputFolder(out, "demo", {}, ("a.jsonl", "b.jsonl"))
    with pytest.raises(WriteError) as err, folder.writing():
        atomic_write_text(out / "a.jsonl", "a\n")
        for p in out.iterdir():
            p.unlink()
        out.rmdir()  # `rm -rf` by someone else; the next write makes the folder anew, without a.jsonl
        atomic_write_text(out / "b.jsonl", "b\n")
    assert str(err.value).startswith(f"{out}: the folder was removed while the run wrote into it; ")
    assert "left no outputs" in str(err.value)
    assert not out.exists()


def test_a_run_that_wrote_the_folder_after_the_check_is_refused_under_the_lock(tmp_path: Path) -> None:
    first = OutputFolder(tmp_path, "demo", {"seed": 1}, ("data.jsonl",))
    second = OutputFolder(tmp_path, "demo", {"seed": 2}, ("data.jsonl",))  # checked before `first` wrote
    with first.writing():
        (tmp_path / "data.jsonl").write_text("1\n")
    before = _files(tmp_path)
    with (
        pytest.raises(UserError, match="was written by another run while this one started"),
        second.writing(),
    ):
        (tmp_path / "data.jsonl").write_text("2\n")
    assert _files(tmp_path) == before


def test_a_second_writer_in_this_process_is_refused_naming_the_first(tmp_path: Path) -> None:
    holder = OutputFolder(tmp_path, "demo", {}, ("data.jsonl",))
    with holder.writing():
        other = OutputFolder(tmp_path, "demo", {}, ("data.jsonl",))
        with pytest.raises(UserError) as err, other.writing():
            pass
    assert f"is being written by another `fspo demo` (pid {os.getpid()}" in str(err.value)
    assert read_record(tmp_path)["state"] == "finished"  # type: ignore[index]


# --- through the CLI: sim run, data convert, train sft ---


def _folder_with_notes(folder: Path) -> Path:
    """`folder`, made, holding one file of the user's (``notes.txt``) that a failed run must keep."""
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


def test_sim_run_on_a_full_disk_leaves_the_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _folder_with_notes(tmp_path / "sim")
    _full_disk(monkeypatch, lambda p: p.startswith(str(out / ".preferences.jsonl")))
    code, said = _fspo(monkeypatch, capsys, *SIM, "--out", out)
    line = _one_error_line(said)
    assert code == 2
    assert f"{out}/preferences.jsonl: the disk is full" in line and "left no outputs" in line
    assert sorted(_files(out)) == ["notes.txt"]
    monkeypatch.undo()  # space freed: the command the message names works
    code, said = _fspo(monkeypatch, capsys, *SIM, "--out", out)
    assert code == 0, said
    assert read_record(out)["state"] == "finished"  # type: ignore[index]


def test_sim_run_on_a_read_only_folder_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _folder_with_notes(tmp_path / "ro")
    _read_only(monkeypatch, out)
    code, said = _fspo(monkeypatch, capsys, *SIM, "--out", out)
    assert code == 2
    assert f"{out}/{RUN_FILE}: the file system is read-only" in _one_error_line(said)
    assert sorted(_files(out)) == ["notes.txt"]
    code, said = _fspo(monkeypatch, capsys, *SIM, "--out", out / "new")
    assert code == 2
    assert f"{out}/new: the file system is read-only" in _one_error_line(said)


@pytest.mark.parametrize(
    "args", [[*SIM, "--out"], ["data", "convert", "{users}"]], ids=["sim-run", "data-convert"]
)
def test_a_symlink_loop_is_one_line(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "loop").symlink_to("loop")
    users = write_jsonl(tmp_path / "users.jsonl", toy_users(3))
    target = tmp_path / "loop" / "out.parquet"
    code, said = _fspo(monkeypatch, capsys, *(a.format(users=users) for a in args), target)
    assert code == 2
    assert "the path runs into a loop of symbolic links" in _one_error_line(said)
    assert str(tmp_path / "loop") in said


def test_sim_run_interrupted_before_writing_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def ctrl_c(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("fspo.sim.simulate", ctrl_c)
    code, said = _fspo(monkeypatch, capsys, *SIM, "--out", tmp_path / "sim")
    assert code == 130
    assert said.strip().splitlines() == [
        f"interrupted: `fspo sim run` stopped before writing anything in {tmp_path / 'sim'}; "
        "rerun it to start again"
    ]
    assert not (tmp_path / "sim").exists()


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_data_convert_fault_leaves_no_file(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    users = write_jsonl(tmp_path / "users.jsonl", toy_users(3))
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "users.parquet"
    if fault == "full":
        _full_disk(monkeypatch, lambda p: p.startswith(str(out)))
    else:
        _read_only(monkeypatch, out)
    code, said = _fspo(monkeypatch, capsys, "data", "convert", users, dst)
    assert code == 2
    line = _one_error_line(said)
    assert str(dst) in line
    assert ("the disk is full" if fault == "full" else "Read-only file system") in line
    assert not any(out.iterdir())
    monkeypatch.undo()
    assert _fspo(monkeypatch, capsys, "data", "convert", users, dst)[0] == 0


def test_train_sft_on_a_full_disk_keeps_a_resumable_run(
    tiny_llama_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk fills while the final model is saved: one line, the staging folder gone, the run kept
    (its checkpoints) and marked running; the rerun the message names finishes it."""
    episodes = write_jsonl(tmp_path / "train.jsonl", toy_episodes(toy_users(4), per_user=2, shots=2))
    out = tmp_path / "run"
    args = ["train", "sft", "--model", tiny_llama_folder, "--episodes", episodes, "--out", out,
            "--batch-size", "4", "--max-steps", "2", "--save-every", "1", "--no-progress"]  # fmt: skip
    _full_disk(monkeypatch, lambda p: "/.model.tmp/" in p)
    code, said = _fspo(monkeypatch, capsys, *args)
    line = _one_error_line(said)
    assert code == 2
    assert "the disk is full" in line and str(out) in line
    assert "rerun the same command with --resume to continue it" in line
    assert read_record(out)["state"] == "running"  # type: ignore[index]
    assert not (out / ".model.tmp").exists() and not (out / "model").exists()
    assert not [p for p in out.rglob("*.tmp")]
    monkeypatch.undo()
    code, said = _fspo(monkeypatch, capsys, *args)  # without the hint: refused, naming it
    assert code == 2 and "pass --resume" in _one_error_line(said)
    code, said = _fspo(monkeypatch, capsys, *args, "--resume")
    assert code == 0, said[-3000:]
    assert read_record(out)["state"] == "finished"  # type: ignore[index]
    assert (out / "model" / "config.json").is_file()


# --- two real processes: a second writer, and a writer killed with kill -9 ---

_HOLDER = """
import sys, time
import fspo.sim
from fspo.cli import main

real = fspo.sim.write_sim

def write_then_hold(out, data, summary):
    real(out, data, summary)
    print("written", flush=True)
    time.sleep(120)

fspo.sim.write_sim = write_then_hold
sys.argv = ["fspo", *sys.argv[1:]]
main()
"""


def test_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    args = [*SIM, "--out", str(out)]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, *args],
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "written\n", holder.stderr
        held = _files(out)
        started = time.monotonic()
        second = subprocess.run(FSPO_CLI + args, env=CLI_ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        line = _one_error_line(second.stderr)
        assert (
            f"--out {out} is being written by another `fspo sim run` (pid {holder.pid}: fspo sim run" in line
        )
        assert time.monotonic() - started < 60  # refused at once, not after the holder finished
        assert _files(out) == held
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert read_record(out)["state"] == "running"  # type: ignore[index]
    again = subprocess.run(FSPO_CLI + args, env=CLI_ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert read_record(out)["state"] == "finished"  # type: ignore[index]


# --- advice: every option an error names exists ---


def _fspo_options() -> set[str]:
    import typer

    from fspo.cli import app

    found = {"--help"}

    def walk(command: object) -> None:
        for param in command.params:  # type: ignore[attr-defined]
            found.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return found


# Options of other programs that a message tells the user to pass to them.
# pip install --no-deps (models/gguf_import.py); initdb --locale (testing/postgres.py)
OTHER_PROGRAMS = {"--no-deps", "--locale"}


def test_every_option_a_message_names_exists() -> None:
    """Every `--option` in a string of the source (messages, help texts; docstrings aside) is an option
    of some fspo command. A piece ending in '-' builds a flag name (f"--no-{name}") and is skipped."""
    known = _fspo_options() | OTHER_PROGRAMS
    src = Path(__file__).parents[1] / "src" / "fspo"
    unknown = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    if not option.endswith("-") and option not in known:
                        unknown.append(f"{path.relative_to(src)}:{node.lineno}: {option}")
    assert not unknown, unknown


def test_a_reader_suggests_skip_invalid_only_to_commands_that_have_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"user_id": "u1"}\n')
    code, said = _fspo(
        monkeypatch, capsys, "data", "convert", bad, tmp_path / "p.parquet", "--kind", "preference"
    )
    assert code == 2 and "--skip-invalid" in said
    code, said = _fspo(monkeypatch, capsys, "serve", "import", bad, "--db", f"sqlite:///{tmp_path}/s.db")
    assert code == 2 and "prefs.jsonl" in said and "--skip-invalid" not in said
