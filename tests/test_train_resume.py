"""Kill -9 mid-run, resume, and end with the same weights as an uninterrupted run (CPU, fixed seed), with
the speed options on: prefix rows of 2 questions per context, length-bucketed batches. The default
options (fspo and sft) are killed and resumed in test_train_kill.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import tiny_llama_dir, write_jsonl
from fspo.testing import toy_corpus, toy_preferences, toy_users

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _command(model: Path, episodes: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", "from fspo.cli import main; main()", "train", "fspo",
        "--model", str(model), "--episodes", str(episodes), "--out", str(out),
        "--batch-size", "2", "--grad-accum", "2", "--max-steps", "24", "--save-every", "4",
        "--lr", "1e-3", "--beta", "0.5", "--epochs", "1", "--no-progress", "--seed", "3", *extra,
    ]  # fmt: skip


def _shared_shot_episodes() -> list:
    """Episodes in pairs that share their shots (for --questions-per-context 2)."""
    from fspo.data.episodes import build_episodes

    users = toy_users(5)
    prefs = toy_preferences(users, per_user=8)
    eps = build_episodes(prefs, users, shots=1, train_passes=2, test_user_fraction=0, heldout_per_user=0,
                         questions_per_context=2)["train"]  # fmt: skip
    return eps


SPEED = ("--logps-impl", "prefix", "--questions-per-context", "2")  # bucketing is on with prefix


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    # With K=2: 24 contexts, 6 steps/epoch, so 24 steps cross epochs.
    eps = _shared_shot_episodes()[:40]
    episodes = write_jsonl(tmp_path / "train.jsonl", eps)
    model = tiny_llama_dir(tmp_path / "llama", toy_corpus(eps) * 3)
    extra = SPEED

    ref_out = tmp_path / "straight"
    subprocess.run(_command(model, episodes, ref_out, *extra), env=ENV, check=True, capture_output=True,
                   timeout=120)  # fmt: skip

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(model, episodes, out, *extra), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 90
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*")):
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed; make it longer")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists(), "killed too late: the run had finished"
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert killed_at < 24

    done = subprocess.run(_command(model, episodes, out, *extra, "--resume"), env=ENV, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout + done.stderr

    # the options really took effect
    start = json.loads((ref_out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["questions_per_context"] > 1.5 and start["group_by_length"] and start["shared_rows"]

    a = load_file(ref_out / "model" / "model.safetensors")
    start = load_file(model / "model.safetensors")
    moved = max((a[k] - start[k]).abs().max().item() for k in a if k in start)
    assert moved > 1e-3  # training really changed the weights
    weights = (ref_out / "model" / "model.safetensors").read_bytes()
    assert (out / "model" / "model.safetensors").read_bytes() == weights
