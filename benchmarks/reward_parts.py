"""Where each system's exact-reward wins come from: relevance vs the user's own trait, per system.

Why this exists: every simulated user's reward is ``2 * relevance + sum_k w_k * phi_k(text)``, so a
win rate mixes two things: whether an answer is on topic (shared by all users) and whether it has
the user's own style (the personalization FSPO is for). When one system answers far better in
general (the quickstart's base model rarely names the question's topic) its win rates saturate and
say nothing about personalization. This splits them apart, per system and user group (the
persona's heaviest trait):

- ``relevance``: the domain's relevance feature, in [0, 1];
- ``own trait``: the mean over the user's traits of the feature of the user's value, in [0, 1]
  (1 = the answer has every trait the user wants); numeric traits without a feature are skipped.

    python benchmarks/reward_parts.py --users runs/quickstart/sim/users.jsonl \\
        runs/quickstart/generate/*.jsonl

Prints one table (mean per system and group) and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from functools import cache
from pathlib import Path

from fspo.eval.readers import users_by_id
from fspo.sim.base import RELEVANCE, Domain
from fspo.sim.registry import get_domain


def parts(users_path: Path, generation_files: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {group: {"relevance", "own_trait", "n"}}} with group "all" over every record."""
    users = users_by_id(users_path)

    @cache
    def domain_of(name: str) -> tuple[Domain, dict[str, int]]:  # one domain and column index per name
        domain = get_domain(name)
        return domain, {c: i for i, c in enumerate(domain.columns)}

    out: dict[str, dict[str, dict[str, float]]] = {}
    for path in generation_files:
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
        system = path.stem
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            rec = json.loads(line)
            system = rec.get("system", system)
            user = users.get(rec["user_id"])
            if user is None:
                raise SystemExit(f"{path}:{line_no}: user {rec['user_id']!r} is not in {users_path}")
            meta = user.metadata or {}
            domain, col = domain_of(meta["domain"])
            traits = domain.check_traits(meta.get("traits"))
            phi = domain.featurize(rec["question"], rec["answer"])
            own = [phi[col[f"{k}={v['value']}"]] for k, v in traits.items() if f"{k}={v['value']}" in col]
            group = domain.group(traits)
            for key in (group, "all"):
                s = sums[key]
                s[0] += phi[col[RELEVANCE]]
                s[1] += sum(own) / len(own) if own else 0.0
                s[2] += 1.0 if own else 0.0
                s[3] += 1
        out[system] = {
            g: {"relevance": s[0] / s[3], "own_trait": s[1] / max(s[2], 1.0), "n": s[3]}
            for g, s in sorted(sums.items())
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=Path, required=True, help="users.jsonl of the simulated users")
    ap.add_argument("generations", type=Path, nargs="+", help="generation files (fspo generate)")
    args = ap.parse_args()
    result = parts(args.users, args.generations)
    groups = sorted({g for per in result.values() for g in per if g != "all"}) + ["all"]
    print(f"{'system':22s} " + " ".join(f"{g[:22]:>24s}" for g in groups))
    print(f"{'':22s} " + " ".join(f"{'relevance / own trait':>24s}" for _ in groups))
    for system, per in result.items():
        cells = [per.get(g) for g in groups]
        shown = [f"{c['relevance']:>11.3f} / {c['own_trait']:.3f}" if c else f"{'-':>24s}" for c in cells]
        print(f"{system:22s} " + " ".join(shown))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
