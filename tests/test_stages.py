"""The stage cache: cached by fingerprint and only while the stage's files are the ones it wrote; a stage
never resumes from another configuration's outputs; ordered append logs resume where a kill left them."""

from __future__ import annotations

import asyncio
import io
import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from fspo.core.stages import MARKER, Stage, StageRunner, fingerprint, run_ordered


def _stage(calls: list[set[str]]):
    def fn(folder: Path) -> dict:
        calls.append({p.name for p in folder.iterdir() if not p.name.startswith("_")})
        (folder / "checkpoint").write_text("partial work")
        return {"ok": True}

    return fn


def test_same_inputs_cached_other_inputs_start_clean(tmp_path: Path) -> None:
    calls: list[set[str]] = []
    runner = StageRunner(tmp_path, console=Console(quiet=True))
    assert runner.run("train", {"lr": 1}, _stage(calls)) == {"ok": True}
    runner.run("train", {"lr": 1}, _stage(calls))
    assert calls == [set()]  # cached: not run again
    runner.run("train", {"lr": 2}, _stage(calls))
    assert calls[-1] == set()  # the lr=1 checkpoint was not offered to the lr=2 run


def test_killed_stage_resumes_only_with_the_same_inputs(tmp_path: Path) -> None:
    calls: list[set[str]] = []

    def killed(folder: Path) -> dict:
        (folder / "checkpoint").write_text("partial work")
        raise KeyboardInterrupt

    runner = StageRunner(tmp_path, console=Console(quiet=True))
    with pytest.raises(KeyboardInterrupt):
        runner.run("train", {"lr": 1}, killed)
    runner.run("train", {"lr": 1}, _stage(calls))
    assert calls[-1] == {"checkpoint"}  # same configuration: resume from its checkpoint
    with pytest.raises(KeyboardInterrupt):
        runner.run("train", {"lr": 3}, killed)
    runner.run("train", {"lr": 2}, _stage(calls))
    assert calls[-1] == set()  # killed under lr=3: nothing of it reaches the lr=2 run


def test_marker_records_the_fingerprint_of_params_and_upstream(tmp_path: Path) -> None:
    runner = StageRunner(tmp_path, console=Console(quiet=True))
    runner.run("a", {"x": 1}, lambda d: {"n": 1})
    runner.run("b", {"y": 2}, lambda d: None, ("a",))
    a = json.loads((tmp_path / "a" / MARKER).read_text())
    b = json.loads((tmp_path / "b" / MARKER).read_text())
    assert list(a) == ["stage", "fingerprint", "params", "seconds", "summary", "outputs", "upstream_outputs"]
    assert a["fingerprint"] == fingerprint({"params": {"x": 1}, "upstream": {}})
    assert b["fingerprint"] == fingerprint({"params": {"y": 2}, "upstream": {"a": a["fingerprint"]}})
    assert runner.marker("b")["summary"] == {} and runner.marker("c") is None


def test_stage_log_resumes_same_inputs_and_restarts_other_ones(tmp_path: Path) -> None:
    stage = Stage(tmp_path, "labels", "fp1")
    assert stage.done() is None
    stage.begin()
    log, done = stage.open_log("labels.jsonl")
    log.append({"i": 0})
    log.close()  # killed here: no marker
    stage.begin()
    log, done = stage.open_log("labels.jsonl")
    assert done == 1  # same inputs: resume after the line it holds
    log.close()
    assert stage.finish({"items": 1}) == {"items": 1} and stage.done()["summary"] == {"items": 1}
    other = Stage(tmp_path, "labels", "fp2")
    assert other.done() is None
    other.begin()
    log, done = other.open_log("labels.jsonl")
    log.close()
    assert done == 0 and other.marker() is None


def test_run_ordered_emits_in_item_order_and_bounds_the_window() -> None:
    running, peak, out = 0, 0, []

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(random.Random(i).random() / 200)
        running -= 1
        return i

    asyncio.run(run_ordered(range(50), work, out.append, window=8))
    assert out == list(range(50)) and peak <= 8


def _quiet_runner(root: Path) -> tuple[StageRunner, io.StringIO]:
    log = io.StringIO()
    return StageRunner(root, console=Console(file=log, width=200)), log


def _writer(calls: list[str], name: str, text: str = "a,b\n" * 50):
    """A stage that writes `text` to `<folder>/data/rows.csv` (a nested file) and counts its runs."""

    def fn(folder: Path) -> dict:
        calls.append(name)
        (folder / "data").mkdir(exist_ok=True)
        (folder / "data" / "rows.csv").write_text(text)
        return {"rows": text.count("\n")}

    return fn


def test_marker_records_size_and_sha256_of_every_output(tmp_path: Path) -> None:
    import hashlib

    runner, _ = _quiet_runner(tmp_path)
    runner.run("sim", {"n": 1}, _writer([], "sim"))
    outputs = runner.marker("sim")["outputs"]
    data = (tmp_path / "sim" / "data" / "rows.csv").read_bytes()
    assert outputs == {"data/rows.csv": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
            "was truncated to 100 bytes (the stage wrote 200 bytes)",
        ),
        (
            lambda f: f.write_text(f.read_text().replace("a,b", "a,c", 1)),
            "was edited since the stage wrote it",
        ),
        (lambda f: f.unlink(), "is missing"),
    ],
    ids=["truncated", "edited", "deleted"],
)
def test_damaged_output_reruns_the_stage_and_says_which_file(tmp_path: Path, damage, reason: str) -> None:
    calls: list[str] = []
    runner, log = _quiet_runner(tmp_path)
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))
    rows = tmp_path / "sim" / "data" / "rows.csv"
    original = rows.read_bytes()
    damage(rows)
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))
    assert calls == ["sim", "sim"]
    line = next(x for x in log.getvalue().splitlines() if "re-running" in x)
    assert f"sim: re-running: {rows} {reason}" in line
    assert rows.read_bytes() == original and runner.marker("sim")["outputs"]["data/rows.csv"]
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))
    assert calls == ["sim", "sim"]  # repaired: cached again


def test_untouched_outputs_are_cached_and_files_added_later_are_not_outputs(tmp_path: Path) -> None:
    calls: list[str] = []
    runner, log = _quiet_runner(tmp_path)
    runner.run("episodes", {"n": 1}, _writer(calls, "episodes"))
    # What a later stage leaves in the folder (training's reference log-prob sidecars) is not a reason
    # to redo this one.
    (tmp_path / "episodes" / "data" / "rows.csv.reflogps-1234.json").write_text("{}")
    runner.run("episodes", {"n": 1}, _writer(calls, "episodes"))
    assert (
        calls == ["episodes"] and "episodes: cached" in log.getvalue() and "re-running" not in log.getvalue()
    )


def test_marker_without_hashes_is_not_trusted(tmp_path: Path) -> None:
    calls: list[str] = []
    runner, log = _quiet_runner(tmp_path)
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))
    marker = tmp_path / "sim" / MARKER
    old = json.loads(marker.read_text())
    del old["outputs"], old["upstream_outputs"]  # as fspo wrote markers before the hashes
    marker.write_text(json.dumps(old))
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))
    assert calls == ["sim", "sim"]
    assert f"sim: re-running: {marker} has no output hashes" in log.getvalue()
    assert "outputs" in json.loads(marker.read_text())


def test_unreadable_marker_reruns_the_stage(tmp_path: Path) -> None:
    calls: list[str] = []
    runner, log = _quiet_runner(tmp_path)
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))
    marker = tmp_path / "sim" / MARKER
    marker.write_text(marker.read_text()[:40])
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))
    assert calls == ["sim", "sim"] and f"sim: re-running: {marker} is not a JSON object" in log.getvalue()


def test_downstream_stays_cached_when_a_rerun_upstream_writes_the_same_bytes(tmp_path: Path) -> None:
    calls: list[str] = []
    runner, log = _quiet_runner(tmp_path)
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))
    runner.run("episodes", {"k": 2}, _writer(calls, "episodes"), ("sim",))
    (tmp_path / "sim" / "data" / "rows.csv").write_text("cut")
    runner.run("sim", {"n": 1}, _writer(calls, "sim"))  # deterministic: the same bytes again
    runner.run("episodes", {"k": 2}, _writer(calls, "episodes"), ("sim",))
    assert calls == ["sim", "episodes", "sim"]
    assert "episodes: cached" in log.getvalue()


def test_downstream_reruns_when_a_rerun_upstream_writes_other_bytes(tmp_path: Path) -> None:
    calls: list[str] = []
    runner, log = _quiet_runner(tmp_path)
    runner.run("model", {"n": 1}, _writer(calls, "model", "weights 1\n"))
    runner.run("train", {"k": 2}, _writer(calls, "train"), ("model",))
    (tmp_path / "model" / "data" / "rows.csv").unlink()
    # Same inputs, so the same fingerprints, but other bytes (a stage that records wall times).
    runner.run("model", {"n": 1}, _writer(calls, "model", "weights 2\n"))
    runner.run("train", {"k": 2}, _writer(calls, "train"), ("model",))
    assert calls == ["model", "train", "model", "train"]
    assert f"train: re-running: {tmp_path / 'model'} holds other outputs than the ones" in log.getvalue()
    runner.run("train", {"k": 2}, _writer(calls, "train"), ("model",))
    assert len(calls) == 4  # and cached again


def test_stage_done_verifies_outputs_and_says_why_on_stderr(tmp_path: Path, capsys) -> None:
    stage = Stage(tmp_path, "labels", "fp1")
    stage.begin()
    (stage.path / "labels.jsonl").write_text('{"i": 0}\n')
    stage.finish({"items": 1})
    assert stage.done() is not None
    (stage.path / "labels.jsonl").write_text("")
    assert stage.done() is None
    assert f"labels: re-running: {stage.path / 'labels.jsonl'} was truncated" in capsys.readouterr().err
