"""`StageRunner`: cached by fingerprint; a stage never resumes from another configuration's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from fspo.core.stages import StageRunner


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
