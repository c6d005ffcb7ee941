"""The output policy (`fspo.core.outputs`): a command never replaces or mixes into another run's outputs
unless told to (`--overwrite`), never touches files it does not write, and a Ctrl-C leaves either nothing
or a run that the same command continues, and says which.

Three layers: `OutputFolder` itself (unit tests, no subprocess); a table of the cheap commands through the
real `fspo` command (one subprocess per call, sha256 of every file before and after a refusal); and
training, where the policy meets `--resume` (in-process, then a real SIGINT to a subprocess).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CLI_ENV, FSPO_CLI, data_cli, train_world, write_jsonl
from fspo.core import outputs
from fspo.core.errors import UserError
from fspo.core.outputs import RUN_FILE, OutputFolder, read_record, require_finished
from fspo.sim import simulate
from fspo.testing import toy_episodes, toy_preferences, toy_users

FIXTURES = Path(__file__).parent / "fixtures"
OWNS = ("data.jsonl", "parts")


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def _no_stale_notes():
    """`outputs.interrupted` is process-wide (the CLI prints it once); each test starts with it empty."""
    outputs.interrupted.clear()
    yield
    outputs.interrupted.clear()


# --- OutputFolder, unit by unit ---


def _write(out: Path, params: dict, **kw: object) -> OutputFolder:
    folder = OutputFolder(out, "demo", params, OWNS, **kw)
    with folder.writing():
        (out / "data.jsonl").write_text(json.dumps(params) + "\n")
    return folder


def test_new_folder_is_created_and_recorded_finished(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    folder = _write(out, {"seed": 1})
    assert not folder.continues and not folder.replace
    record = read_record(out)
    assert record is not None
    assert (record["command"], record["state"], record["params"]) == ("demo", "finished", {"seed": 1})


def test_same_settings_continue(tmp_path: Path) -> None:
    _write(tmp_path, {"seed": 1})
    again = OutputFolder(tmp_path, "demo", {"seed": 1}, OWNS)
    assert again.continues and not again.replace


def test_other_settings_refused_naming_folder_overwrite_and_field(tmp_path: Path) -> None:
    _write(tmp_path, {"seed": 1, "n": 4})
    before = _hashes(tmp_path)
    with pytest.raises(UserError) as err:
        OutputFolder(tmp_path, "demo", {"seed": 2, "n": 4}, OWNS)
    message = str(err.value)
    assert str(tmp_path) in message and "--overwrite" in message
    assert "seed: 1 -> 2" in message and "n:" not in message  # only the field that differs
    assert _hashes(tmp_path) == before


def test_another_commands_folder_refused(tmp_path: Path) -> None:
    _write(tmp_path, {"seed": 1})
    with pytest.raises(UserError, match=r"the outputs of `fspo demo`.*--overwrite"):
        OutputFolder(tmp_path, "other", {"seed": 1}, OWNS)


def test_owned_files_without_a_record_refused(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("from before fspo kept records\n")
    with pytest.raises(UserError, match="data.jsonl from a run fspo has no record of"):
        OutputFolder(tmp_path, "demo", {"seed": 1}, OWNS)


def test_foreign_files_alone_do_not_block_and_are_never_removed(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    _write(tmp_path, {"seed": 1})  # a folder holding only files the command does not write: it starts
    _write(tmp_path, {"seed": 2}, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_removes_owned_outputs_first(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path, "demo", {"seed": 1}, OWNS)
    with folder.writing():
        (tmp_path / "parts").mkdir()
        (tmp_path / "parts" / "old-0.jsonl").write_text("old")
        (tmp_path / "data.jsonl").write_text("old")
    replacing = OutputFolder(tmp_path, "demo", {"seed": 2}, OWNS, overwrite=True)
    assert replacing.replace
    with replacing.writing():
        # By the time the body runs, the previous run's outputs are gone (nothing of it can mix in).
        assert not (tmp_path / "parts").exists() and not (tmp_path / "data.jsonl").exists()
        (tmp_path / "data.jsonl").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([RUN_FILE, "data.jsonl"])
    assert read_record(tmp_path)["params"] == {"seed": 2}  # type: ignore[index]


def test_interrupted_non_resumable_run_leaves_no_outputs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    folder = OutputFolder(tmp_path, "demo", {"seed": 1}, OWNS)
    with pytest.raises(KeyboardInterrupt), folder.writing():
        (tmp_path / "data.jsonl").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no outputs, no record
    assert len(outputs.interrupted) == 1
    assert "`fspo demo` left no outputs" in outputs.interrupted[0] and "rerun" in outputs.interrupted[0]


def test_interrupted_non_resumable_run_in_a_new_folder_removes_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt), OutputFolder(out, "demo", {}, OWNS).writing():
        (out / "data.jsonl").write_text("half")
        raise KeyboardInterrupt
    assert not out.exists()


def test_interrupted_resumable_run_keeps_its_files_running(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path, "demo", {"seed": 1}, OWNS, resumable=True)
    with pytest.raises(KeyboardInterrupt), folder.writing():
        (tmp_path / "data.jsonl").write_text("first half\n")
        raise KeyboardInterrupt
    assert (tmp_path / "data.jsonl").read_text() == "first half\n"
    assert read_record(tmp_path)["state"] == "running"  # type: ignore[index]
    assert "partial `fspo demo` run" in outputs.interrupted[0]
    assert "rerun the same command" in outputs.interrupted[0]
    assert OutputFolder(tmp_path, "demo", {"seed": 1}, OWNS, resumable=True).continues


def test_require_finished_refuses_a_running_folder(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path, "demo", {}, OWNS, resumable=True)
    with pytest.raises(KeyboardInterrupt), folder.writing():
        (tmp_path / "data.jsonl").write_text("first half\n")
        raise KeyboardInterrupt
    with pytest.raises(UserError, match=r"`fspo demo` that writes it did not finish.*rerun that command"):
        require_finished(tmp_path)
    require_finished(tmp_path / "no record here")  # a folder fspo did not write is read as it is


def test_damaged_record_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / RUN_FILE).write_text('{"command": "de')
    with pytest.raises(UserError, match=RUN_FILE):
        OutputFolder(tmp_path, "demo", {}, OWNS)


# --- the cheap commands through the real CLI ---


@dataclass(frozen=True)
class Row:
    """A command run with settings `a`, then `b`: both formatted with `s` (shared inputs), `f` (the
    fixtures folder) and `o` (the output). `out` is the output path relative to the case folder: a
    folder (the command writes several files and a run record) or a single file (replaced only with
    --overwrite, even by the same settings)."""

    id: str
    a: str
    b: str
    out: str
    refusal: str  # what the refusal of `b` must say (the differing setting, for a folder)
    is_file: bool = False


ROWS = [
    Row("sim-run", "sim run --users 4 --prefs-per-user 3 --seed 0 --out {o}",
        "sim run --users 4 --prefs-per-user 3 --seed 1 --out {o}", "out", "seed: 0 -> 1"),
    Row("data-import", "data import {f}/elix.jsonl -f elix -o {o}",
        "data import {f}/elix.jsonl -f elix -o {o} --no-scorer-match", "out", "scorer_match: true -> false"),
    Row("data-episodes", "data episodes -d {s}/data -n 2 --seed 0 -o {o}",
        "data episodes -d {s}/data -n 2 --seed 1 -o {o}", "out", "seed: 0 -> 1"),
    Row("report", "report {s}/run --out {o} --title A", "report {s}/run --out {o} --title B", "out",
        'title: "A" -> "B"'),
    Row("data-convert", "data convert {s}/data/users.jsonl {o}", "data convert {s}/users3.jsonl {o}",
        "out/users.parquet", "exists", is_file=True),
    Row("sim-corpus", "sim corpus --n 5 --seed 0 --out {o}", "sim corpus --n 5 --seed 1 --out {o}",
        "out/corpus.jsonl", "exists", is_file=True),
    Row("eval-winrate", "eval winrate --a {s}/a.jsonl --b {s}/b.jsonl --users {s}/users.jsonl --out {o}",
        "eval winrate --a {s}/c.jsonl --b {s}/b.jsonl --users {s}/users.jsonl --out {o}",
        "out/w.json", "exists", is_file=True),
]  # fmt: skip
FOREIGN = "out/notes.txt"  # a user's file beside (or inside) the output, there before any run


def _fspo(args: str, **fmt: object) -> tuple[int, str]:
    done = subprocess.run(
        FSPO_CLI + shlex.split(args.format(**fmt)), env=CLI_ENV, capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder, users, three systems' generations and a run folder with a win-rate result."""
    root = tmp_path_factory.mktemp("outputs_shared")
    users = toy_users(4)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "users.jsonl", users)
    write_jsonl(root / "data" / "preferences.jsonl", toy_preferences(users, per_user=6))
    write_jsonl(root / "users3.jsonl", users[:3])
    # The exact judge needs simulated users (their rewards): three, answering their own questions.
    sim = simulate("roleplay", 3, 2, seed=0)
    write_jsonl(root / "users.jsonl", sim.users)
    asked = [
        {"episode_id": f"e{i}", "user_id": p.user_id, "split": "test_seen", "question": p.question,
         "description": None}
        for i, p in enumerate(sim.preferences)
    ]  # fmt: skip
    systems = [("a", "fspo", "chosen"), ("b", "base", "rejected"), ("c", "fspo", "rejected")]
    for name, system, answer in systems:
        rows = [
            {**q, "system": system, "answer": getattr(p, answer)}
            for q, p in zip(asked, sim.preferences, strict=True)
        ]
        write_jsonl(root / f"{name}.jsonl", rows)
    (root / "run").mkdir()
    code, output = _fspo(
        "eval winrate --a {s}/a.jsonl --b {s}/b.jsonl --users {s}/users.jsonl --out {s}/run/winrate.json",
        s=root,
    )
    assert code == 0, output
    return root


@dataclass
class Steps:
    """What each call of a row returned, and the hashes of the case folder after it."""

    case: Path
    calls: dict[str, tuple[int, str]]
    hashes: dict[str, dict[str, str]]


def _play(row: Row, shared: Path, case: Path) -> Steps:
    (case / "out").mkdir(parents=True)
    (case / FOREIGN).write_text("the user's own notes")
    fmt = {"s": shared, "f": FIXTURES, "o": case / row.out}
    calls: dict[str, tuple[int, str]] = {}
    hashes = {"start": _hashes(case)}
    steps = [("a", row.a), ("a-again", row.a), ("b", row.b), ("b-overwrite", row.b + " --overwrite")]
    for step, args in steps:
        calls[step] = _fspo(args, **fmt)
        hashes[step] = _hashes(case)
    return Steps(case, calls, hashes)


@pytest.fixture(scope="module")
def played(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Steps]:
    root = tmp_path_factory.mktemp("outputs_table")
    with ThreadPoolExecutor(2) as pool:
        futures = {r.id: pool.submit(_play, r, shared, root / r.id) for r in ROWS}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_cli_output_policy(row: Row, played: dict[str, Steps]) -> None:
    steps = played[row.id]
    calls, hashes = steps.calls, steps.hashes
    shown = {k: f"exit {c}: {o[-1500:]}" for k, (c, o) in calls.items()}

    assert calls["a"][0] == 0, shown["a"]
    after_a = hashes["a"]
    assert row.out in after_a or any(name.startswith(row.out + "/") for name in after_a)

    # The same settings again: a folder command writes the same outputs again; a file command refuses
    # to replace its file (a single file has no record to tell the same run from another).
    again_code, again_out = calls["a-again"]
    if row.is_file:
        assert again_code == 2 and "--overwrite" in _flat(again_out), shown["a-again"]
    else:
        assert again_code == 0, shown["a-again"]
    assert hashes["a-again"] == after_a, "rerunning the same settings changed the outputs"

    # Other settings: refused, nothing changed, the message says how to replace them.
    code, output = calls["b"]
    assert code == 2, shown["b"]
    assert "Traceback" not in output and "--overwrite" in _flat(output), shown["b"]
    assert str(steps.case / row.out) in _flat(output) and row.refusal in _flat(output), shown["b"]
    assert hashes["b"] == after_a, "a refused run changed files"

    # Other settings with --overwrite: B's outputs replace A's.
    assert calls["b-overwrite"][0] == 0, shown["b-overwrite"]
    final = hashes["b-overwrite"]
    outputs_a = {k: v for k, v in after_a.items() if k != FOREIGN and not k.endswith(RUN_FILE)}
    outputs_b = {k: v for k, v in final.items() if k != FOREIGN and not k.endswith(RUN_FILE)}
    assert outputs_b and outputs_b != outputs_a
    if not row.is_file:
        record = read_record(steps.case / row.out)
        assert record is not None and record["state"] == "finished"

    # The user's own file survived every step.
    assert all(h[FOREIGN] == hashes["start"][FOREIGN] for h in hashes.values())


# --- a data folder whose run did not finish is not read ---


def test_reader_refuses_an_unfinished_data_folder(shared: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("users.jsonl", "preferences.jsonl"):
        (data / name).write_bytes((shared / "data" / name).read_bytes())
    # What `fspo sim run` leaves while it writes (or if it was killed between its files).
    (data / RUN_FILE).write_text(json.dumps({"command": "sim run", "fingerprint": "f", "state": "running"}))
    code, message = data_cli("episodes", "--data", data, "-n", 2, "-o", tmp_path / "eps")
    assert code == 2
    assert "`fspo sim run` that writes it did not finish" in message and "rerun" in message
    assert not (tmp_path / "eps").exists()


def test_sim_run_interrupted_between_its_files_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after users.jsonl was written and before preferences.jsonl: no half data folder."""
    from fspo.data import io
    from fspo.sim import cli as sim_cli

    def users_then_ctrl_c(folder, preferences, users):
        io.write_records(Path(folder) / "users.jsonl", users)
        raise KeyboardInterrupt

    monkeypatch.setattr("fspo.sim.export.write_dataset_dir", users_then_ctrl_c)
    out = tmp_path / "sim"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        sim_cli.run(domain="roleplay", users=3, prefs_per_user=2, seed=0, out=out, option=[], overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert outputs.interrupted == [f"`fspo sim run` left no outputs in {out}; rerun it to write them"]


# --- training: the policy meets --resume ---


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    episodes = toy_episodes(toy_users(8), per_user=4, shots=2)
    return train_world(tmp_path_factory.mktemp("outputs_train"), episodes)


def test_train_refuses_rerun_other_settings_and_overwrites_cleanly(
    train_inputs: dict[str, Path], tmp_path: Path
) -> None:
    from fspo.train.config import make_config, recipe
    from fspo.train.trainer import train

    out = tmp_path / "run"

    def cfg(**kw: object):
        values = {**recipe("fspo"), "model": str(train_inputs["llama"]),
                  "episodes": str(train_inputs["train"]), "out": str(out), "batch_size": 4,
                  "max_steps": 2, "log_every": 1, "progress": False, "seed": 1, **kw}  # fmt: skip
        return make_config(values)

    train(cfg())
    assert read_record(out)["state"] == "finished"  # type: ignore[index]
    before = _hashes(out)

    with pytest.raises(UserError) as err:
        train(cfg())
    said = str(err.value)
    assert "a finished run" in said and "--resume" in said and "--overwrite" in said

    with pytest.raises(UserError) as err:
        train(cfg(lr=1e-3), resume=True)
    assert "lr:" in str(err.value) and "--overwrite" in str(err.value)
    assert _hashes(out) == before

    train(cfg(lr=1e-3), overwrite=True)
    events = [json.loads(x).get("event") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1  # one run in the log, not two interleaved
    assert read_record(out)["params"]["lr"] == 1e-3  # type: ignore[index]


def _logged_step(out: Path) -> bool:
    path = out / "metrics.jsonl"
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            if "loss" in json.loads(line):
                return True
    return False


def test_ctrl_c_during_training_says_what_to_rerun_and_resume_finishes(
    train_inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # 120 steps: on a loaded machine the first logged step can be seen late.
    cmd = [*FSPO_CLI, "train", "fspo", "--model", str(train_inputs["llama"]),
           "--episodes", str(train_inputs["train"]), "--out", str(out), "--batch-size", "2",
           "--max-steps", "120", "--save-every", "2", "--log-every", "1", "--no-progress",
           "--seed", "5"]  # fmt: skip
    # Ctrl-C as at a terminal: a suite started in the background by a shell (`make test &`) inherits
    # SIGINT ignored, and so would the command, which would then rightly train on to the end.
    proc = subprocess.Popen(
        cmd,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 90
    while not _logged_step(out):
        assert proc.poll() is None, "the run ended before its first step"
        assert time.monotonic() < deadline, "no step logged within 90 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    said = _flat(stderr)
    assert "Traceback" not in said
    assert "interrupted:" in said and "rerun the same command" in said, said[-2000:]
    assert not (out / "model").exists(), "the run finished before Ctrl-C"
    assert read_record(out)["state"] == "running"  # type: ignore[index]

    done = subprocess.run([*cmd, "--resume"], env=CLI_ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_record(out)["state"] == "finished"  # type: ignore[index]
    assert (out / "model").is_dir()
