"""The stage cache: cached by fingerprint; a stage never resumes from another configuration's outputs;
ordered append logs resume where a kill left them."""

from __future__ import annotations

import asyncio
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
    assert list(a) == ["stage", "fingerprint", "params", "seconds", "summary"]
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
