"""Kill -9 mid-run, resume, and end with the same weights as an uninterrupted run (CPU, fixed seed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_helpers import tiny_llama, toy_corpus, toy_episodes, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _command(model: Path, episodes: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", "from fspo.cli import main; main()", "train", "fspo",
        "--model", str(model), "--episodes", str(episodes), "--out", str(out),
        "--batch-size", "2", "--grad-accum", "2", "--max-steps", "24", "--save-every", "4",
        "--lr", "1e-3", "--beta", "0.5", "--epochs", "1", "--no-progress", "--seed", "3", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    eps = toy_episodes(n_users=8, per_user=4, shots=1)  # 32 episodes: 8 steps/epoch, so 24 steps cross epochs
    episodes = write_jsonl(tmp_path / "train.jsonl", eps)
    model = tiny_llama(tmp_path / "llama", toy_corpus(eps) * 3)

    ref_out = tmp_path / "straight"
    subprocess.run(_command(model, episodes, ref_out), env=ENV, check=True, capture_output=True, timeout=120)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(model, episodes, out), env=ENV, stdout=subprocess.DEVNULL,
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

    done = subprocess.run(_command(model, episodes, out, "--resume"), env=ENV, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout + done.stderr

    a = load_file(ref_out / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    start = load_file(model / "model.safetensors")
    moved = max((a[k] - start[k]).abs().max().item() for k in a if k in start)
    assert moved > 1e-3  # training really changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
