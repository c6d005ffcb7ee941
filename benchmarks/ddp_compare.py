"""Real 2-process DDP on CPU vs 1 process: same data, same global batch, compare the loss curves.

Run (both launchers work; `accelerate launch --cpu --num_processes 2` silently starts ONE process):

    .venv/bin/python benchmarks/ddp_compare.py            # prepares data + model, runs both, compares

It launches `torchrun --standalone --nproc_per_node 2 -m fspo.cli ...`-style runs of `fspo train fspo`
with ACCELERATE_USE_CPU=1; the 2-process run uses half the per-process batch so the global batch
(and therefore the data order, see `fspo.train.buckets.batch_order`) matches the 1-process run.
Prints both loss curves and a final JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fspo.data.io import write_records
from fspo.models.default import init_model
from fspo.testing import toy_corpus, toy_episodes, toy_users

STEPS = 20
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}  # fmt: skip
ENTRY = "from fspo.cli import main; main()"


def run(root: Path, procs: int) -> tuple[list[dict], float, int]:
    out = root / f"run{procs}"
    args = ["train", "fspo", "--model", str(root / "llama"), "--episodes", str(root / "train.jsonl"),
            "--out", str(out), "--batch-size", str(8 // procs), "--max-steps", str(STEPS), "--log-every", "1",
            "--lr", "1e-3", "--beta", "0.5", "--warmup-steps", "0", "--no-progress"]  # fmt: skip
    script = root / "entry.py"
    script.write_text(ENTRY + "\n")
    if procs == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(procs), str(script), *args]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    elapsed = time.perf_counter() - t
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    return [r for r in rows if "loss" in r], elapsed, start["processes"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        eps = toy_episodes(toy_users(8), per_user=24, shots=2)
        write_records(root / "train.jsonl", eps)
        init_model(root / "llama", toy_corpus(eps) * 2, size="tiny", seed=0)
        one, t1, p1 = run(root, 1)
        two, t2, p2 = run(root, 2)
    print(f"processes: {p1} vs {p2}; wall time {t1:.1f}s vs {t2:.1f}s")
    print(f"{'step':>4} {'loss 1 proc':>12} {'loss 2 procs':>13} {'acc 1':>6} {'acc 2':>6}")
    for a, b in zip(one, two, strict=True):
        print(f"{a['step']:>4} {a['loss']:>12.4f} {b['loss']:>13.4f} {a['reward_accuracy']:>6.2f} "
              f"{b['reward_accuracy']:>6.2f}")  # fmt: skip
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True))
    summary = {
        "benchmark": "ddp_compare",
        "processes": [p1, p2],
        "wall_s": [round(t1, 1), round(t2, 1)],
        "loss_1": [round(r["loss"], 4) for r in one],
        "loss_2": [round(r["loss"], 4) for r in two],
        "max_abs_loss_diff": diff,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
