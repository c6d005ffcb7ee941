"""Per-step time and peak memory of FSPO (IPO) training steps for 4 and 8 shots on the default model.

Memory: peak resident set size of this process (`resource.getrusage`, ru_maxrss) — what the OS must
provide — plus the Python-level peak of the step (`tracemalloc`, which does not see torch's C++
allocations, so it shows the trainer's own overhead). Prints a table, then one JSON line.

    .venv/bin/python benchmarks/train_memory.py [--size small] [--steps 4] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from fspo.data.schema import Episode, Preference
from fspo.data.template import TemplateOptions
from fspo.data.tokens import pad_id_of
from fspo.infer.logps import compute_pair_logps
from fspo.models.default import init_model
from fspo.models.loading import load_model, load_tokenizer
from fspo.train.losses import preference_loss
from fspo.train.tokenize import tokenize_episodes

WORDS = "the a user likes short long answers with facts stories examples plans science history".split()  # noqa: SIM905


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def synthetic_episodes(shots: int, n: int, answer_words: int = 45, seed: int = 0) -> list[Episode]:
    """Roleplay-sized episodes (answers of ~45 words, as the simulator writes) without the simulator."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prefs = [
            Preference(user_id="u", question=f"What should I know about topic {i}-{j}?",
                       chosen=_text(rng, answer_words), rejected=_text(rng, answer_words))
            for j in range(shots + 1)
        ]  # fmt: skip
        out.append(Episode(episode_id=f"e{i}", user_id="u", shots=prefs[:-1], query=prefs[-1]))
    return out


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def measure(model_dir: Path, shots: int, steps: int, batch_size: int, include_dispreferred: bool) -> dict:
    tok = load_tokenizer(model_dir)
    policy = load_model(model_dir).train()
    ref = load_model(model_dir).eval().requires_grad_(False)
    opt = torch.optim.RMSprop(policy.parameters(), lr=1e-5)
    options = TemplateOptions(include_dispreferred=include_dispreferred, max_tokens=4096)
    examples, _ = tokenize_episodes(synthetic_episodes(shots, batch_size * (steps + 1)), tok, options)
    times, tokens, py_peak = [], 0, 0
    for s in range(steps + 1):  # step 0 is warm-up, not timed
        batch = [e.tokens for e in examples[s * batch_size : (s + 1) * batch_size]]
        tracemalloc.start()
        t = time.perf_counter()
        with torch.no_grad():
            rc, rr = compute_pair_logps(ref, batch, pad_id_of(tok))
        pc, pr = compute_pair_logps(policy, batch, pad_id_of(tok))
        preference_loss("ipo", pc.sum, pr.sum, rc.sum, rr.sum, beta=0.1).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t
        py_peak = max(py_peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        if s:
            times.append(elapsed)
            tokens += sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in batch)
    return {
        "shots": shots,
        "batch_size": batch_size,
        "mean_prompt_tokens": sum(len(e.tokens.prompt) for e in examples) / len(examples),
        "step_s": sum(times) / len(times),
        "train_tok_per_s": tokens / sum(times),
        "peak_rss_mb": peak_rss_mb(),
        "python_peak_mb": py_peak / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-dispreferred", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = [_text(random.Random(i), 60) for i in range(400)]
        model_dir = init_model(Path(tmp) / "m", corpus, size=args.size)
        params = sum(p.numel() for p in load_model(model_dir).parameters())
        rows = [measure(model_dir, k, args.steps, args.batch_size, not args.no_dispreferred) for k in (4, 8)]
    print(f"model size {args.size}: {params / 1e6:.2f}M parameters; IPO step = ref forward + policy fwd/bwd")
    print(
        f"{'shots':>5} {'prompt tok':>10} {'step s':>8} {'tok/s':>8} {'peak RSS MB':>12} {'py peak MB':>11}"
    )
    for r in rows:
        cells = (r["shots"], r["mean_prompt_tokens"], r["step_s"], r["train_tok_per_s"], r["peak_rss_mb"])
        print(" ".join(f"{c:>11.4g}" for c in (*cells, r["python_peak_mb"])))
    print(json.dumps({"benchmark": "train_memory", "size": args.size, "parameters": params, "results": rows}))


if __name__ == "__main__":
    main()
