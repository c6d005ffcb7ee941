"""How much can N shots tell about a simulated user's next choice? A Bayes ceiling, no model involved.

Why this exists: "accuracy vs shots" (`fspo eval accuracy`) is only meaningful next to
what the shots *could* tell. For simulated users the answer is computable: every preference is
decided by a linear reward over the domain's exact features, so a learner that knows the feature
space and holds the training users' personas as its hypotheses can do Bayesian inference from the
shots (`fspo.eval.personal.shot_ceiling`, also a section of every quickstart report). Per held-out
episode and number of shots n:

    posterior(u) ∝ prod_{i<=n} (1 - eps if persona u orders shot i as the user did else eps)
    prediction   = posterior-weighted vote of the personas on the query pair

(`eps` is the label-noise rate the learner assumes; it only matters when no persona fits.) With
n = 0 this is the *population* learner, the best a zero-shot model trained on these users can do
on average; the rise with n is all the personalization there is to learn. On unseen users the
zero-shot figure can sit below 0.5: their held-out trait combinations invert what the training
population prefers (docs/research/shot-ceiling.md).

    python benchmarks/shot_ceiling.py --episodes runs/quickstart/episodes \\
        --users runs/quickstart/sim/users.jsonl [--hypotheses train|population]

`--hypotheses train` (the default here, as in docs/research/shot-ceiling.md) holds only the training
users' personas; `population` (the report's) holds every persona of the population.

Prints a table per split (accuracy and 95% Wilson interval per n) and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fspo.data.episodes import load_episodes
from fspo.eval.personal import shot_ceiling
from fspo.eval.readers import users_by_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=Path, required=True, help="folder with train/test_* episode files")
    ap.add_argument("--users", type=Path, required=True, help="users.jsonl of the simulated population")
    ap.add_argument("--max-shots", type=int, default=8)
    ap.add_argument("--eps", type=float, default=0.05, help="label noise the learner assumes")
    ap.add_argument("--limit", type=int, default=1000, help="episodes per split (the first N)")
    ap.add_argument("--hypotheses", choices=("train", "population"), default="train")
    args = ap.parse_args()

    start = time.perf_counter()
    users = users_by_id(args.users)
    episodes = {s: load_episodes(args.episodes, s)[: args.limit] for s in ("test_unseen", "test_seen")}
    result = shot_ceiling(
        users, {s: e for s, e in episodes.items() if e}, args.max_shots, args.eps, args.hypotheses
    )
    for split, curve in result.items():
        print(f"\n{split}: Bayes ceiling ({args.hypotheses} personas), {len(episodes[split])} episodes")
        print(f"{'shots':>5}  {'accuracy':>8}  95% CI")
        for n, c in curve.items():
            print(f"{n:>5}  {c['accuracy']:8.3f}  [{c['ci_low']:.3f}, {c['ci_high']:.3f}]  n={c['n']}")
    print(
        json.dumps(
            {
                "ceiling": result,
                "hypotheses": args.hypotheses,
                "eps": args.eps,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
