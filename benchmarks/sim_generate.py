"""Time the default roleplay population: 1,500 users x 100 preferences, then their episodes.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sim_generate.py [--users N] [--prefs P]``.
Prints seconds per phase; the target for the defaults is well under a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fspo.data.episodes import build_episodes
from fspo.sim import simulate, stats, write_sim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", default="roleplay")
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--prefs", type=int, default=100)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = simulate(args.domain, args.users, args.prefs, seed=args.seed)
    timings["simulate"] = time.perf_counter() - start

    start = time.perf_counter()
    summary = stats(data)
    timings["stats + disagreement"] = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_sim(Path(tmp), data, summary)
        timings["write jsonl"] = time.perf_counter() - start

    start = time.perf_counter()
    episodes = build_episodes(data.preferences, data.users, shots=args.shots, seed=args.seed)
    timings[f"build_episodes ({args.shots} shots)"] = time.perf_counter() - start

    print(f"{args.domain}: {len(data.users)} users, {len(data.preferences)} preferences")
    print("episodes: " + ", ".join(f"{split} {len(eps)}" for split, eps in episodes.items()))
    for name, seconds in timings.items():
        print(f"{name:>32}: {seconds:6.2f} s")
    print(f"{'total':>32}: {sum(timings.values()):6.2f} s")


if __name__ == "__main__":
    main()
