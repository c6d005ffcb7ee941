"""Training-step speed: plain vs prefix-shared log-probs, the cached reference, K questions per row.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py [--shots 2 4 8] [--reps 5] \
        [--step-shots 4] [--ks 2 4] [--step-pairs 16]

Table 1 times forward + backward of the policy's summed target log-probs (the IPO/DPO loss on top
costs nothing) for a random-init Llama of a few million parameters on synthetic episodes with FSPO's
lengths: each shot is a question (15-30 tokens) and two answers (30-60 tokens) under the template's
headings, the query's answers are 30-60 tokens, so the prompt P is 6-20x the answer R. The two paths
alternate within each repetition (the order flips every repetition), so load from other processes on
a shared machine hits both alike.

Table 2 times a whole IPO training step (reference log-probs + policy forward/backward + loss) on
the same pairs, batch after batch, in four ways, interleaved the same way: the plain path with a
reference forward in every step (the trainer's default before the speed options), the shared path
with a reference forward per step, the shared path with cached reference log-probs
(`fspo.train.refcache`: the step runs no reference at all; the one-time cost of building the cache
is printed separately), and the same with K questions of one user per row sharing the shots
(`fspo.train.contexts`). Every batch holds the same `--batch-size` pairs in every configuration
(K=4: one row of 4 questions). tok/s counts plain-path tokens (2 x prompt + both answers per pair)
for all, so the ratios are speed-ups; the "ideal" column is the work ratio if a backward pass costs
two forwards and cost were linear in tokens.

Peak memory: a fresh subprocess per path (glibc told to give every large block back to the system,
MALLOC_MMAP_THRESHOLD_, so resident memory tracks live tensors) runs one warm-up step, resets its
peak resident set (/proc/self/clear_refs) and reports the peak during one more step minus the
resident set before it: the step's own memory, model and data excluded.

Prints the tables, then as its LAST line one JSON object: table 1 per number of shots, and table 2
under "training_step".
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
from transformers import LlamaForCausalLM

from fspo.infer.pairs import ContextTokens, PairTokens, QuestionTokens
from fspo.infer.prefix import pair_logps, plain_pair_logps, shared_pair_logps
from fspo.testing import tiny_llama
from fspo.train.buckets import bucketed_batches, padding_fraction
from fspo.train.losses import preference_loss
from fspo.train.refcache import reference_logps

VOCAB = 8192
PAD = 0
# Token counts of the template's fixed text (headings, "# Example i", task sentence), measured
# with the SmolLM2 tokenizer on the default layout.
SHOT_OVERHEAD = 20
TASK_OVERHEAD = 20
HEADING = 5


def model() -> LlamaForCausalLM:
    return tiny_llama(
        VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ).train()


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
    chosen, rejected = fn(policy, batch, PAD)
    (chosen.sum - rejected.sum).sum().backward()


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


def user_context(rng: random.Random, shots: int, k: int) -> ContextTokens:
    """One user's shots and `k` held-out questions with their answers; lengths as in `episode`."""

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    shared = [1]
    for _ in range(shots):
        shared += ids(SHOT_OVERHEAD, SHOT_OVERHEAD) + ids(15, 30) + ids(30, 60) + ids(30, 60)
    shared += ids(TASK_OVERHEAD, TASK_OVERHEAD)
    answer = lambda: ids(HEADING, HEADING) + ids(30, 60) + [2]  # noqa: E731
    return ContextTokens(shared, [QuestionTokens(ids(15, 30), answer(), answer()) for _ in range(k)])


def split_context(ctx: ContextTokens, k: int) -> list[ContextTokens]:
    """The same pairs as contexts of `k` questions (k=1: one question per row, as the trainer's K=1)."""
    if k == 1:
        return [ContextTokens.of(p) for p in ctx.pairs()]
    return [ContextTokens(ctx.shared, ctx.items[i : i + k]) for i in range(0, len(ctx.items), k)]


STEP_CONFIGS = [  # (name, shared rows, cached reference)
    ("plain, reference per step", False, False),
    ("shared, reference per step", True, False),
    ("shared, cached reference", True, True),
]


def training_step_table(args: argparse.Namespace) -> dict:
    """Table 2 (see the module docstring): whole IPO steps on the same pairs, interleaved."""
    kmax = max([1, *args.ks])
    per_batch = args.batch_size
    if any(per_batch % k for k in args.ks):
        raise SystemExit(f"--batch-size {per_batch} must be a multiple of every --ks value")
    rng = random.Random(args.seed + 1000)
    n_users = max(1, args.step_pairs // kmax)
    users = [user_context(rng, args.step_shots, kmax) for _ in range(n_users)]
    pairs = [p for u in users for p in u.pairs()]
    # batch b holds pairs [b*per_batch, (b+1)*per_batch) in every configuration
    n_batches = len(pairs) // per_batch
    configs = [(name, shared, cached, 1) for name, shared, cached in STEP_CONFIGS]
    configs += [(f"shared, cached reference, K={k}", True, True, k) for k in args.ks if k > 1]
    layouts: dict[int, list[list[tuple[list[str], ContextTokens]]]] = {}
    for k in {c[3] for c in configs}:
        units = []
        for u_i, user in enumerate(users):
            q = 0
            for ctx in split_context(user, k):
                units.append(([f"u{u_i}-q{q + j}" for j in range(len(ctx.items))], ctx))
                q += len(ctx.items)
        per = per_batch // k
        layouts[k] = [units[b * per : (b + 1) * per] for b in range(n_batches)]

    policy = model()
    ref = model().eval().requires_grad_(False)  # same init: the policy starts at the reference
    cache: dict[str, tuple[float, float]] = {}

    def step(config: tuple, batch: list[tuple[list[str], ContextTokens]]) -> None:
        _, shared, cached, _ = config
        contexts = [c for _, c in batch]
        policy.zero_grad(set_to_none=True)
        if cached:
            ids = [i for names, _ in batch for i in names]
            ref_c = torch.tensor([cache[i][0] for i in ids])
            ref_r = torch.tensor([cache[i][1] for i in ids])
        else:
            with torch.no_grad():
                ref_lp = pair_logps(ref, contexts, PAD, shared=shared)
            ref_c, ref_r = ref_lp[0].sum, ref_lp[1].sum
        if shared:
            chosen, rejected = shared_pair_logps(policy, contexts, PAD)
        else:
            chosen, rejected = plain_pair_logps(policy, [p for c in contexts for p in c.pairs()], PAD)
        preference_loss("ipo", chosen.sum, rejected.sum, ref_c, ref_r, 0.5).loss.backward()

    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    for c in configs[:2]:  # warm-up, untimed
        step(c, layouts[c[3]][0])
    t = time.perf_counter()  # what a run pays once, before its first step (then reused)
    cache.update(reference_logps(ref, [u for b in layouts[1] for u in b], PAD, batch_size=per_batch)[0])
    cache_s = time.perf_counter() - t
    for c in configs[2:]:
        step(c, layouts[c[3]][0])
    for rep in range(args.reps):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]  # rotate who goes first
        for b in range(n_batches):
            for c in order:
                t = time.perf_counter()
                step(c, layouts[c[3]][b])
                times[c[0]].append(time.perf_counter() - t)

    used = pairs[: n_batches * per_batch]
    work = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in used)  # plain-path tokens
    S = statistics.mean(len(u.shared) for u in users)
    q = statistics.mean(len(x.question) for u in users for x in u.items)
    R = statistics.mean((len(p.chosen) + len(p.rejected)) / 2 for p in used)
    P = S + q
    cost = {  # per pair, in token-forwards; backward = 2 forwards
        "plain, reference per step": 2 * (P + R) * (1 + 3),
        "shared, reference per step": (P + 2 * R) * (1 + 3),
        "shared, cached reference": (P + 2 * R) * 3,
    }
    for k in args.ks:
        if k > 1:
            cost[f"shared, cached reference, K={k}"] = (S / k + q + 2 * R) * 3
    base = sum(times[configs[0][0]]) / args.reps
    rows = {}
    for name, *_ in configs:
        per_pass = sum(times[name]) / args.reps
        rows[name] = {
            "tok_s": round(work / per_pass),
            "pairs_s": round(len(used) / per_pass, 2),
            "speedup": round(base / per_pass, 3),
            "ideal": round(cost[configs[0][0]] / cost[name], 3),
            "step_s_median": round(statistics.median(times[name]), 3),
        }
    return {
        "shots": args.step_shots,
        "pairs": len(used),
        "batch_pairs": per_batch,
        "S": round(S, 1),
        "q": round(q, 1),
        "R": round(R, 1),
        "cache_build_s": round(cache_s, 3),
        "cache_build_s_per_pair": round(cache_s / len(used), 4),
        "configs": rows,
    }


def print_step_table(r: dict) -> None:
    print(
        f"\ntraining step (IPO: reference + policy fwd/bwd), {r['shots']} shots, {r['pairs']} pairs, "
        f"batch {r['batch_pairs']} pairs; shared prefix S={r['S']}, question q={r['q']}, answer R={r['R']}"
    )
    print(f"{'configuration':<34} {'tok/s':>7} {'pairs/s':>8} {'speed-up':>8} {'ideal':>6} {'step s':>7}")
    for name, c in r["configs"].items():
        print(
            f"{name:<34} {c['tok_s']:>7} {c['pairs_s']:>8} {c['speedup']:>8} {c['ideal']:>6} "
            f"{c['step_s_median']:>7}"
        )
    print(
        f"building the reference cache (once, reused by later runs): {r['cache_build_s']} s for "
        f"{r['pairs']} pairs = {r['cache_build_s_per_pair']} s/pair",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-shots", type=int, default=4, help="shots for the training-step table")
    ap.add_argument("--ks", type=int, nargs="*", default=[2, 4], help="questions per context to time")
    ap.add_argument("--step-pairs", type=int, default=16, help="pairs timed in the training-step table")
    ap.add_argument("--no-policy-table", action="store_true", help="only the training-step table")
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
    results: dict = {}
    if not args.no_policy_table:
        print(
            f"{'shots':>5} {'P':>7} {'R':>5} {'plain tok/s':>11} {'shared tok/s':>12} {'speed-up':>8} "
            f"{'ideal':>6} {'of ideal':>8} {'peak MB plain/shared':>21}"
        )
    for shots in [] if args.no_policy_table else args.shots:
        memory = {path: probe_memory(path, shots, args) for path in ("plain", "shared")}
        r = run(shots, args.episodes, args.batch_size, args.reps, args.seed, memory)
        results[str(shots)] = r
        print(
            f"{shots:>5} {r['P']:>7} {r['R']:>5} {r['plain_tok_s']:>11} {r['shared_tok_s']:>12} "
            f"{r['speedup']:>8} {r['ideal']:>6} {r['fraction_of_ideal']:>8} "
            f"{r['plain_peak_mb']:>10}/{r['shared_peak_mb']:<10}",
            flush=True,
        )
    results["training_step"] = training_step_table(args)
    print_step_table(results["training_step"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
