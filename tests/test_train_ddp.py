"""Real 2-process DDP (torchrun, CPU) with the speed options: same losses as one process.

The 2-process run computes the reference cache sharded across processes (each scores half of the
episodes, all gather) and splits each length-bucketed global batch of K=2 contexts between them; with
the same global batch it must follow the 1-process run's loss curve. It must also exit: the
processes used to hang now and then at the very end (the DDP wrapper freed after the process group).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_llama_dir, write_jsonl
from fspo.data.episodes import build_episodes
from fspo.testing import toy_corpus, toy_preferences, toy_users

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.mark.slow
def test_two_processes_follow_one_with_prefix_k2_and_cache(tmp_path: Path) -> None:
    # 9 preferences per user, 1 shot + 2 queries per block: every context holds exactly 2 pairs, so
    # each process's mean over its pairs averages to the 1-process mean
    users = toy_users(8)
    prefs = toy_preferences(users, per_user=9)
    eps = build_episodes(prefs, users, shots=1, train_passes=2, test_user_fraction=0.25, heldout_per_user=0,
                         questions_per_context=2)  # fmt: skip
    model = tiny_llama_dir(tmp_path / "llama", toy_corpus(eps["train"]) * 2)
    (tmp_path / "entry.py").write_text("from fspo.cli import main; main()\n")
    curves, starts = {}, {}
    for procs in (1, 2):
        data = tmp_path / f"data{procs}"  # each run its own episodes file: both compute the cache
        data.mkdir()
        write_jsonl(data / "train.jsonl", eps["train"])
        write_jsonl(data / "test_unseen.jsonl", eps["test_unseen"])
        out = tmp_path / f"run{procs}"
        args = ["train", "fspo", "--model", str(model), "--episodes", str(data), "--eval-episodes", str(data),
                "--out", str(out), "--batch-size", str(4 // procs), "--max-steps", "8", "--log-every", "1",
                "--lr", "1e-3", "--beta", "0.5", "--warmup-steps", "0", "--no-progress",
                "--logps-impl", "prefix", "--questions-per-context", "2"]  # fmt: skip
        launcher = [sys.executable] if procs == 1 else [
            str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"
        ]  # fmt: skip
        done = subprocess.run([*launcher, str(tmp_path / "entry.py"), *args], env=ENV, capture_output=True,
                              text=True, timeout=150)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        starts[procs] = rows[0]
        curves[procs] = [r for r in rows if "loss" in r and "event" not in r] + [rows[-1]]
    assert starts[2]["processes"] == 2 and starts[2]["questions_per_context"] == 2.0
    assert starts[2]["reference"]["train"]["computed"] == starts[1]["reference"]["train"]["computed"] > 0
    for a, b in zip(curves[1][:-1], curves[2][:-1], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-4)
    assert curves[1][-2]["loss"] != curves[1][0]["loss"]
    assert curves[2][-1]["eval/loss"] == pytest.approx(curves[1][-1]["eval/loss"], abs=2e-4)
    caches = [json.loads(next((tmp_path / f"data{p}").glob("train.jsonl.reflogps-*.json")).read_text())
              for p in (1, 2)]  # fmt: skip
    one, two = (c["entries"] for c in caches)
    assert one.keys() == two.keys()
    assert max(abs(one[k]["chosen"] - two[k]["chosen"]) for k in one) < 1e-4
