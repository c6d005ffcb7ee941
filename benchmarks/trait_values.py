"""Which of the users' trait values each system's answers carry, value by value.

Why this exists: the quickstart report gives each system's *share* of trait values carried
(`fspo.eval.personal.trait_shares`); a share of 60% can be every positive and no negative user, or
the other way round. This counts, per split and trait value, the answers that carry it
(`Domain.carried`, the same test the share uses), so a system that writes one style for everyone (the
population model) shows as all of one value and none of the other.

    python benchmarks/trait_values.py runs/quickstart-reviews oracle fspo population-ipo

Reads `<run>/sim` (the users) and `<run>/generate/<system>.jsonl`. Prints one line per system and a
last line of JSON: {system: {"<split>:<trait>=<value>": [carried, answers]}}.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from fspo.data.io import read_dataset_dir
from fspo.sim.registry import get_domain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a quickstart run folder (holding sim/ and generate/)")
    parser.add_argument("systems", nargs="+", help="systems whose generate/<system>.jsonl to read")
    args = parser.parse_args()

    _, users, _ = read_dataset_dir(args.run / "sim")
    traits = {u.user_id: (u.metadata or {}).get("traits") for u in users}
    domain = get_domain(next(u.metadata["domain"] for u in users if (u.metadata or {}).get("domain")))
    result: dict[str, dict[str, list[int]]] = {}
    for system in args.systems:
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        with open(args.run / "generate" / f"{system}.jsonl") as f:
            for line in f:
                rec = json.loads(line)
                user = domain.check_traits(traits[rec["user_id"]])
                carried = domain.carried(user, domain.features(rec["question"], [rec["answer"]])[0])
                split = rec["split"].removeprefix("test_")
                for (trait, spec), has in zip(user.items(), carried, strict=True):
                    cell = counts[f"{split}:{trait}={spec['value']}"]
                    cell[0] += int(has)
                    cell[1] += 1
        result[system] = dict(sorted(counts.items()))
        print(system, " ".join(f"{k} {a}/{n}" for k, (a, n) in result[system].items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
