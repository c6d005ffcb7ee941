"""How much can N shots tell about a simulated user's next choice? A Bayes ceiling, no model involved.

Why this exists: "accuracy vs shots" (`fspo eval accuracy`) is only meaningful next to
what the shots *could* tell. For simulated users the answer is computable: every preference is
decided by a linear reward over the domain's exact features, so a learner that knows the feature
space and holds the training users' personas as its hypotheses can do Bayesian inference from the
shots. Per held-out episode and number of shots n:

    posterior(u) ∝ prod_{i<=n} (1 - eps if persona u orders shot i as the user did else eps)
    prediction   = posterior-weighted vote of the personas on the query pair

(`eps` is the label-noise rate the learner assumes; it only matters when no persona fits.) With
n = 0 this is the *population* learner, the best a zero-shot model trained on these users can do
on average; the rise with n is all the personalization there is to learn. On unseen users the
zero-shot figure can sit below 0.5: their held-out trait combinations invert what the training
population prefers (docs/research/shot-ceiling.md).

    python benchmarks/shot_ceiling.py --episodes runs/quickstart/episodes \\
        --users runs/quickstart/sim/users.jsonl

Prints a table per split (accuracy and 95% Wilson interval per n) and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from fspo.data.episodes import load_episodes
from fspo.data.io import read_records
from fspo.data.schema import Episode, Preference, User
from fspo.eval.stats import wilson_interval
from fspo.sim.registry import get_domain


def pair_difference(domain, pref: Preference) -> np.ndarray:
    """phi(chosen) - phi(rejected): a persona with weights w prefers the chosen answer iff w·d > 0."""
    feats = domain.features(pref.question, [pref.chosen, pref.rejected])
    return feats[0] - feats[1]


def ceiling_curve(
    domain, hypotheses: np.ndarray, episodes: list[Episode], max_shots: int, eps: float
) -> dict[int, list[float]]:
    """Per n in 0..max_shots, one outcome per episode: 1 right, 0 wrong, 0.5 for an even vote."""
    log_fit, log_miss = np.log(1 - eps), np.log(eps)
    outcomes: dict[int, list[float]] = defaultdict(list)
    for ep in episodes:
        query_votes = hypotheses @ pair_difference(domain, ep.query)  # > 0: persona agrees with the user
        shot_votes = np.stack([hypotheses @ pair_difference(domain, s) for s in ep.shots[:max_shots]], 1)
        for n in range(min(max_shots, len(ep.shots)) + 1):
            log_post = np.where(shot_votes[:, :n] > 0, log_fit, log_miss).sum(1)
            post = np.exp(log_post - log_post.max())
            post /= post.sum()
            right = post[query_votes > 0].sum() + 0.5 * post[query_votes == 0].sum()
            outcomes[n].append(1.0 if right > 0.5 + 1e-12 else 0.0 if right < 0.5 - 1e-12 else 0.5)
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=Path, required=True, help="folder with train/test_* episode files")
    ap.add_argument("--users", type=Path, required=True, help="users.jsonl of the simulated population")
    ap.add_argument("--max-shots", type=int, default=8)
    ap.add_argument("--eps", type=float, default=0.05, help="label noise the learner assumes")
    ap.add_argument("--limit", type=int, default=1000, help="episodes per split (the first N)")
    args = ap.parse_args()
    if not 0 < args.eps < 0.5:
        ap.error(f"--eps must be in (0, 0.5), got {args.eps}")

    start = time.perf_counter()
    users = read_records(args.users, User)
    # Unmarked users (a population held out by user) have only training combinations of traits.
    train_users = [u for u in users if "traits" in (u.metadata or {}) and u.metadata.get("split") != "test"]
    if not train_users:
        raise SystemExit(f"{args.users}: no training user with metadata.traits (not a simulated population?)")
    domain = get_domain(train_users[0].metadata["domain"])
    hypotheses = np.stack([domain.weights(domain.check_traits(u.metadata["traits"])) for u in train_users])

    result: dict[str, dict[str, dict[str, float]]] = {}
    for split in ("test_unseen", "test_seen"):
        episodes = load_episodes(args.episodes, split)[: args.limit]
        if not episodes:  # a population without test users of this kind
            continue
        curve = ceiling_curve(domain, hypotheses, episodes, args.max_shots, args.eps)
        print(f"\n{split}: Bayes ceiling over {len(train_users)} training personas, {len(episodes)} episodes")
        print(f"{'shots':>5}  {'accuracy':>8}  95% CI")
        result[split] = {}
        for n, outs in sorted(curve.items()):
            acc = float(np.mean(outs))
            lo, hi = wilson_interval(sum(outs), len(outs))
            print(f"{n:>5}  {acc:8.3f}  [{lo:.3f}, {hi:.3f}]  n={len(outs)}")
            result[split][str(n)] = {
                "accuracy": round(acc, 4),
                "ci_low": round(lo, 4),
                "ci_high": round(hi, 4),
                "n": len(outs),
            }
    print(
        json.dumps(
            {
                "ceiling": result,
                "hypotheses": len(train_users),
                "eps": args.eps,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
