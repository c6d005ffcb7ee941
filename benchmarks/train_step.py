"""Training-step speed: plain two-sequence log-probs vs the prefix-shared path, same batches, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py [--shots 2 4 8] [--reps 5]

Times forward + backward of the policy's summed target log-probs (the IPO/DPO loss on top costs
nothing) for a random-init Llama of a few million parameters on synthetic episodes with FSPO's
lengths: each shot is a question (15-30 tokens) and two answers (30-60 tokens) under the template's
headings, the query's answers are 30-60 tokens, so the prompt P is 6-20x the answer R. The two paths
alternate within each repetition (the order flips every repetition), so load from other processes on
a shared machine hits both alike.

Peak memory: a fresh subprocess per path (glibc told to give every large block back to the system,
MALLOC_MMAP_THRESHOLD_, so resident memory tracks live tensors) runs one warm-up step, resets its
peak resident set (/proc/self/clear_refs) and reports the peak during one more step minus the
resident set before it: the step's own memory, model and data excluded.

Prints a table, then as its LAST line one JSON object with the figures per number of shots.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fspo.train.prefix import (
    PairTokens,
    bucketed_batches,
    padding_fraction,
    plain_pair_logps,
    shared_pair_logps,
)

VOCAB = 8192
PAD = 0
# Token counts of the template's fixed text (headings, "# Example i", task sentence), measured
# with the SmolLM2 tokenizer on the default layout.
SHOT_OVERHEAD = 20
TASK_OVERHEAD = 20
HEADING = 5


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").train()


def episode(rng: random.Random, shots: int) -> PairTokens:
    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    prompt = [1]
    for _ in range(shots):
        prompt += ids(SHOT_OVERHEAD, SHOT_OVERHEAD) + ids(15, 30) + ids(30, 60) + ids(30, 60)
    prompt += ids(TASK_OVERHEAD, TASK_OVERHEAD) + ids(15, 30)
    return PairTokens(
        prompt, ids(HEADING, HEADING) + ids(30, 60) + [2], ids(HEADING, HEADING) + ids(30, 60) + [2]
    )


def peak_rss_mb(fn: Callable[[], None]) -> float:
    """Peak resident memory above the starting point while `fn` runs (Linux; NaN elsewhere)."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")

    def read(key: str) -> float:
        line = next(x for x in status.read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) / 1024

    before = read("VmRSS:")
    fn()
    return read("VmHWM:") - before


def probe_memory(path: str, shots: int, args: argparse.Namespace) -> float:
    """Run `--probe` in a fresh process (see the module docstring) and read its one number."""
    cmd = [sys.executable, __file__, "--probe", path, "--shots", str(shots), "--episodes", str(args.episodes)]
    cmd += ["--batch-size", str(args.batch_size), "--seed", str(args.seed), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def batches_for(
    shots: int, episodes: int, batch_size: int, seed: int
) -> tuple[list[PairTokens], list[list[int]]]:
    rng = random.Random(seed + shots)
    data = [episode(rng, shots) for _ in range(episodes)]
    shared_len = [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in data]
    return data, bucketed_batches(shared_len, batch_size, seed=seed)


def step(policy: LlamaForCausalLM, path: str, batch: list[PairTokens]) -> None:
    policy.zero_grad(set_to_none=True)
    fn = plain_pair_logps if path == "plain" else shared_pair_logps
    lp = fn(policy, batch, PAD)
    (lp.chosen - lp.rejected).sum().backward()


def run(shots: int, episodes: int, batch_size: int, reps: int, seed: int, memory: dict[str, float]) -> dict:
    data, buckets = batches_for(shots, episodes, batch_size, seed)
    plain_len = [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in data]
    shared_len = [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in data]
    naive = [list(range(i, i + batch_size)) for i in range(0, episodes, batch_size)]
    batches = [[data[i] for i in b] for b in buckets]
    policy = model()
    P = statistics.mean(len(p.prompt) for p in data)
    R = statistics.mean((len(p.chosen) + len(p.rejected)) / 2 for p in data)
    work = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in data)  # plain-path tokens

    times: dict[str, list[float]] = {"plain": [], "shared": []}
    for path in times:  # warm-up, untimed
        step(policy, path, batches[0])
    for rep in range(reps):
        order = ["plain", "shared"] if rep % 2 == 0 else ["shared", "plain"]
        for batch in batches:
            for path in order:
                t = time.perf_counter()
                step(policy, path, batch)
                times[path].append(time.perf_counter() - t)
    per_pass = {k: sum(v) / reps for k, v in times.items()}  # seconds per pass over all batches
    ratio = per_pass["plain"] / per_pass["shared"]
    ideal = 2 * (P + R) / (P + 2 * R)
    return {
        "shots": shots,
        "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
        "episodes": episodes,
        "batch_size": batch_size,
        "P": round(P, 1),
        "R": round(R, 1),
        "plain_tok_s": round(work / per_pass["plain"]),
        "shared_tok_s": round(work / per_pass["shared"]),
        "speedup": round(ratio, 3),
        "ideal": round(ideal, 3),
        "fraction_of_ideal": round(ratio / ideal, 3),
        "plain_peak_mb": round(memory["plain"], 1),
        "shared_peak_mb": round(memory["shared"], 1),
        "padding_plain_naive": round(padding_fraction(plain_len, naive), 3),
        "padding_plain_bucketed": round(padding_fraction(plain_len, buckets), 3),
        "padding_shared_naive": round(padding_fraction(shared_len, naive), 3),
        "padding_shared_bucketed": round(padding_fraction(shared_len, buckets), 3),
        "step_s_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", choices=["plain", "shared"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:  # child process of `probe_memory`
        data, buckets = batches_for(args.shots[0], args.episodes, args.batch_size, args.seed)
        batch = [data[i] for i in max(buckets, key=lambda b: sum(len(data[i].prompt) for i in b))]
        policy = model()
        step(policy, args.probe, batch)
        print(peak_rss_mb(lambda: step(policy, args.probe, batch)))
        return
    results = {}
    print(
        f"{'shots':>5} {'P':>7} {'R':>5} {'plain tok/s':>11} {'shared tok/s':>12} {'speed-up':>8} "
        f"{'ideal':>6} {'of ideal':>8} {'peak MB plain/shared':>21}"
    )
    for shots in args.shots:
        memory = {path: probe_memory(path, shots, args) for path in ("plain", "shared")}
        r = run(shots, args.episodes, args.batch_size, args.reps, args.seed, memory)
        results[str(shots)] = r
        print(
            f"{shots:>5} {r['P']:>7} {r['R']:>5} {r['plain_tok_s']:>11} {r['shared_tok_s']:>12} "
            f"{r['speedup']:>8} {r['ideal']:>6} {r['fraction_of_ideal']:>8} "
            f"{r['plain_peak_mb']:>10}/{r['shared_peak_mb']:<10}",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
