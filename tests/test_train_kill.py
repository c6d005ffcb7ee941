"""A real SIGKILL mid-training, then `--resume`: final weights equal an uninterrupted run's, byte for byte.

`fspo train` runs as a subprocess (CPU, fixed seed), is killed after its first checkpoint and one more
logged step, and is run again with the same command plus `--resume`. Resume restores model,
optimizer, scheduler and RNG states from the checkpoint (`fspo.train.checkpoint`) and the data
position from the step (`fspo.train.buckets.batch_order`); any of them missing shows up here as a
different safetensors file. The steps logged after the checkpoint are run and logged again, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import train_world
from fspo.testing import toy_episodes, toy_users

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
STEPS = 16


def _command(stage: str, model: Path, episodes: Path, out: Path, *extra: str) -> list[str]:
    # 32 episodes in batches of 2 x 2: 8 steps an epoch, so the run crosses an epoch boundary.
    return [
        sys.executable, "-c", "from fspo.cli import main; main()", "train", stage,
        "--model", str(model), "--episodes", str(episodes), "--out", str(out),
        "--batch-size", "2", "--grad-accum", "2", "--max-steps", str(STEPS), "--save-every", "4",
        "--lr", "1e-3", "--no-progress", "--seed", "5", "--log-every", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_world(tmp_path_factory.mktemp("kill"), toy_episodes(toy_users(8), per_user=4, shots=2))


def _logged_steps(out: Path) -> list[int]:
    rows = []
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):  # the line being written
                rows.append(json.loads(line))
    return [r["step"] for r in rows if "loss" in r]


def _kill_after_first_checkpoint(cmd: list[str], out: Path) -> int:
    """Start `cmd`; SIGKILL it once a complete checkpoint exists and a later step was logged.

    Returns the step of the latest checkpoint."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (list((out / "checkpoints").glob("step-*")) and max(_logged_steps(out), default=0) > 4):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "model").exists(), "killed too late: the run had finished"
    return max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["fspo", "sft"])
def test_sigkill_then_resume_gives_the_same_bytes(world: dict[str, Path], tmp_path: Path, stage: str) -> None:
    straight = tmp_path / "straight"
    subprocess.run(_command(stage, world["llama"], world["train"], straight), env=ENV, check=True,
                   capture_output=True, timeout=120)  # fmt: skip

    out = tmp_path / "killed"
    cmd = _command(stage, world["llama"], world["train"], out)
    killed_at = _kill_after_first_checkpoint(cmd, out)
    assert 0 < killed_at < STEPS
    assert max(_logged_steps(out)) > killed_at  # steps the resume must redo, and not log twice
    done = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step {killed_at}/{STEPS}" in done.stdout + done.stderr  # it said where it resumed

    weights = (straight / "model" / "model.safetensors").read_bytes()
    assert weights != (world["llama"] / "model.safetensors").read_bytes()  # training changed them
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    # The log holds each step once, with the uninterrupted run's loss.
    assert _logged_steps(out) == list(range(1, STEPS + 1))
    assert _losses(out) == _losses(straight)


def test_resume_without_a_checkpoint_says_so(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    cmd = _command("sft", world["llama"], world["train"], out, "--max-steps", "1", "--resume")
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    said = " ".join((done.stdout + done.stderr).split())
    assert f"no checkpoint in {out / 'checkpoints'}: starting from step 0" in said
