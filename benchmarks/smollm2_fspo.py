"""The SmolLM2 recipe: FSPO with LoRA on SmolLM2-135M-Instruct within an hour of this 2-core CPU, then
measured on users never seen in training (new combinations of traits), judged by their exact reward.

    fspo sim run --domain reviews --users 1500 --prefs-per-user 40 --seed 0 \\
        --option pairing=minimal --option test_fraction=0.2 --out runs/smollm2-reviews/sim
    fspo data episodes --data runs/smollm2-reviews/sim --shots 8 --out runs/smollm2-reviews/episodes
    fspo data episodes --data runs/smollm2-reviews/sim --shots 8 --questions-per-context 8 \\
        --out runs/smollm2-reviews/episodes-k8
    python benchmarks/smollm2_fspo.py --recipe configs/smollm2/reviews.yaml \\
        --train-episodes runs/smollm2-reviews/episodes-k8 --eval-episodes runs/smollm2-reviews/episodes \\
        --users runs/smollm2-reviews/sim/users.jsonl --out runs/smollm2-reviews

(`fspo quickstart --domain reviews` writes the same ``sim/`` and ``episodes/``: same seed, same
options.) The training is `fspo train fspo --config <recipe>` (`fspo.train.trainer.train`, resumable
after a kill: run the same command again) into ``<out>/fspo``. Then, on the first ``--n`` unseen-user
episodes of ``--eval-episodes``:

* answers of four systems (one decoding for all: greedy by default, or sampled with ``--temperature``,
  ``--top-p``, ``--repetition-penalty``, ``--no-repeat-ngram-size``; with ``--best-of N`` each system
  keeps the best of N samples by its own implicit reward, `fspo.infer.best_of`; ``--max-new-tokens``):
  the untuned model without shots ("base"),
  few-shot prompting of the untuned model (the same 8 shots in its chat template), the FSPO model
  without shots (its own no-shot control: what it learned about the population), and FSPO with the
  shots;
* win rates by each user's exact reward: FSPO vs its no-shot control, vs few-shot prompting, vs base;
  few-shot prompting vs base (Wilson 95% intervals, ties count half);
* the share of each user's trait values the answers carry (`fspo.eval.personal.trait_shares`) and the
  share of answers that are repetition loops (`fspo.eval.personal.loop_shares`);
* implicit-reward accuracy of the FSPO model (reference: the untuned model, which is the recipe's
  IPO reference) on held-out preferences of the same users at 0, 2, 4 and 8 shots;
* example answers, so that one can read whether they are English.

Every evaluation stage is cached under ``--out`` (`fspo.core.stages.StageRunner`; generation resumes
from its append log). The results also go into the trained model's card (``<out>/fspo/model/README.md``,
`fspo.train.card`), and into ``<out>/results.json``. Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fspo.core.files import atomic_write_json, json_lines
from fspo.core.stages import StageRunner
from fspo.data.episodes import load_episodes
from fspo.data.template import TemplateOptions
from fspo.eval import accuracy_curve, generate_for_episodes, winrate
from fspo.eval.personal import loop_shares, trait_shares
from fspo.eval.readers import read_generations, users_by_id
from fspo.infer.best_of import SELF, Reference, training_reference
from fspo.infer.generate import Decoding
from fspo.models.gguf_import import import_gguf
from fspo.models.loading import load_model, load_tokenizer
from fspo.train.card import SUMMARY_FILE, write_model_card
from fspo.train.config import load_config
from fspo.train.trainer import finished, train

# Every system in the model's chat template: the untuned instruct model is prompted as it was tuned,
# and the recipe trains FSPO in it (`chat_template: true`).
CHAT = TemplateOptions(chat_template=True)
PAIRS = (("fspo", "fspo-no-shots"), ("fspo", "few-shot-prompting"), ("fspo", "base"),
         ("few-shot-prompting", "base"))  # fmt: skip


def _train(args: argparse.Namespace, base: str, console: Console) -> dict[str, Any]:
    """Train the recipe into ``<out>/fspo`` (resuming a killed run); a finished run is kept as it is."""
    out = Path(args.out) / "fspo"
    cfg = load_config(args.recipe, {"model": base, "episodes": args.train_episodes, "out": str(out),
                                    "progress": not args.no_progress})  # fmt: skip
    if finished(cfg):
        console.print(f"[dim]• train: finished in {out} (delete it to train again)[/]")
    else:
        train(cfg, resume=True)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return {"summary": summary, "config": cfg.model_dump(mode="json")}


def _curve(folder: Path) -> list[dict[str, float]]:
    """Logged training points (step, loss, reward accuracy, margin, pairs/s)."""
    keep = ("step", "loss", "reward_accuracy", "margin", "chosen_nll", "pairs_per_s")
    rows = [row for _, row in json_lines(folder / "metrics.jsonl")]
    return [{k: round(r[k], 4) for k in keep if k in r} for r in rows if "loss" in r and "event" not in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="configs/smollm2/reviews.yaml", help="training config (YAML)")
    ap.add_argument("--train-episodes", required=True, help="episodes built with the recipe's K per context")
    ap.add_argument("--eval-episodes", required=True, help="episodes folder whose test_unseen is evaluated")
    ap.add_argument("--users", required=True, help="the simulator's users.jsonl (exact-reward judge)")
    ap.add_argument("--out", default="runs/smollm2-reviews")
    ap.add_argument("--n", type=int, default=120, help="unseen-user episodes to evaluate")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--accuracy-shots", default="0,2,4,8")
    ap.add_argument("--examples", type=int, default=4, help="example answers in the report")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (every system alike)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=0)
    ap.add_argument("--best-of", type=int, default=1, help="N samples per answer, best by implicit reward")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    decoding = Decoding.of(
        "options", temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, seed=0,
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    console = Console()
    out = Path(args.out)

    base = str(import_gguf("smollm2-135m-instruct"))
    start = time.perf_counter()
    trained = _train(args, base, console)
    fspo = str(out / "fspo" / "model")
    beta = trained["config"]["beta"]

    runner = StageRunner(out / "eval", console=console)
    episodes = load_episodes(args.eval_episodes, "test_unseen", limit=args.n)
    systems = (("base", base, 0), ("few-shot-prompting", base, None),  # (name, model, shots; None = all)
               ("fspo-no-shots", fspo, 0), ("fspo", fspo, None))  # fmt: skip
    # The trained model's fingerprint: a retrained model re-runs every evaluation.
    model_id = {"trained": trained["summary"].get("metrics"), "steps": trained["summary"].get("steps")}
    settings = {
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "decoding": decoding.model_dump(),
        "best_of": args.best_of,
        "eval": str(args.eval_episodes),
        **model_id,
    }

    progress = not args.no_progress

    def generate(folder: Path) -> dict[str, int]:
        counts = {}
        for name, path, shots in systems:
            model, tokenizer = load_model(path), load_tokenizer(path)
            console.print(f"  generating: {name} ({len(episodes)} episodes)")
            reference = None
            if args.best_of > 1:  # each system ranks by its own implicit reward (the module doc)
                ref, ref_beta = training_reference(path)
                ref_model = None if ref is None else load_model(ref)
                reference = Reference(ref_model, SELF if ref is None else "base", ref_beta)
            rows = generate_for_episodes(
                model, tokenizer, episodes, shots=shots, system=name, decoding=decoding, batch_size=8,
                options=CHAT, max_new_tokens=args.max_new_tokens, best_of=args.best_of,
                reference=reference, out=folder / f"{name}.jsonl",
                progress=progress,
            )  # fmt: skip
            counts[name] = len(rows)
        return counts

    runner.run("generate", settings, generate)
    shots_list = [int(x) for x in args.accuracy_shots.split(",")]

    def accuracy(folder: Path) -> dict[str, Any]:
        curve = accuracy_curve(
            load_model(fspo), load_tokenizer(fspo), {"unseen": episodes}, shots=shots_list,
            ref_model=load_model(base), beta=beta, options=CHAT, model_name="fspo", ref_name="base",
        )  # fmt: skip
        return {"points": curve["splits"]["unseen"]}

    acc = runner.run("accuracy", {**settings, "shots": shots_list}, accuracy)["points"]

    files = {name: runner.folder("generate") / f"{name}.jsonl" for name, _, _ in systems}
    wins = []
    for a, b in PAIRS:
        r = next(x for x in winrate(files[a], files[b], args.users, "exact").results if x.split == "unseen")
        wins.append({"system": a, "opponent": b, **r.model_dump()})
    users = users_by_id(args.users)
    rows = {name: {row["episode_id"]: row for _, row in read_generations(f)} for name, f in files.items()}
    carried = trait_shares(users, [row for by_id in rows.values() for row in by_id.values()])  # per system
    loops = loop_shares(row for by_id in rows.values() for row in by_id.values())
    examples = []
    for ep in episodes[: args.examples]:
        desc = users[ep.user_id].description if ep.user_id in users else ""
        answers = {name: rows[name][ep.episode_id]["answer"] for name in ("fspo", "base")}
        examples.append({"user": desc, "question": ep.query.question, **answers})

    table = Table(title=f"SmolLM2-135M-Instruct + FSPO (LoRA), unseen users, exact judge, n={len(episodes)}")
    for col in ("system", "vs", "win rate [95% CI]", "wins/ties/losses"):
        table.add_column(col)
    for r in wins:
        ci = f"{r['win_rate']:.1%} [{r['ci_low']:.0%}-{r['ci_high']:.0%}]"
        table.add_row(r["system"], r["opponent"], ci, f"{r['wins']}/{r['ties']}/{r['losses']}")
    console.print(table)
    for p in acc:
        console.print(f"implicit-reward accuracy at {p['shots']} shots: {p['accuracy']:.3f} "
                      f"[{p['ci_low']:.2f}-{p['ci_high']:.2f}] n={p['n']}")  # fmt: skip
    for name, share in carried.items():
        console.print(f"trait values carried by {name}: {share}")
    for ex in examples:
        text = f"\n{ex['user']}: {ex['question']}\n  FSPO: {ex['fspo']}\n  base: {ex['base']}"
        console.print(text, markup=False)

    train_s = trained["summary"].get("seconds")
    result = {
        "winrates": [
            {
                k: r[k]
                for k in (
                    "system",
                    "opponent",
                    "win_rate",
                    "ci_low",
                    "ci_high",
                    "wins",
                    "ties",
                    "losses",
                    "n",
                )
            }
            for r in wins
        ],  # fmt: skip
        "accuracy": [{k: p[k] for k in ("shots", "accuracy", "ci_low", "ci_high", "n")} for p in acc],
        "accuracy_gain": round(acc[-1]["accuracy"] - acc[0]["accuracy"], 4),
        "trait_values_carried": carried,
        "loops": loops,
        "decoding": decoding.describe(),
        "best_of": args.best_of,
        "train_seconds": train_s,
        "eval_seconds": {
            n: round((runner.marker(n) or {}).get("seconds", 0), 1) for n in ("generate", "accuracy")
        },
        "examples": examples,
        "curve": _curve(out / "fspo"),
        "recipe": trained["config"],
        "time": time.strftime("%Y-%m-%d %H:%M"),
        "wall_seconds_this_call": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(out / "results.json", result)
    card_results = {
        "Win rates on unseen users (exact reward, 95% Wilson interval)": [
            {
                "system": r["system"],
                "vs": r["opponent"],
                "win rate": f"{r['win_rate']:.1%}",
                "95% CI": f"{r['ci_low']:.0%}-{r['ci_high']:.0%}",
                "n": r["n"],
            }
            for r in wins  # fmt: skip
        ],
        "Implicit-reward accuracy on unseen users' held-out preferences": [
            {
                "shots": p["shots"],
                "accuracy": f"{p['accuracy']:.3f}",
                "95% CI": f"{p['ci_low']:.2f}-{p['ci_high']:.2f}",
                "n": p["n"],
            }
            for p in acc  # fmt: skip
        ],
        "Example answers (unseen users)": [
            {"user": ex["user"], "question": ex["question"], "FSPO": ex["fspo"], "untuned": ex["base"]}
            for ex in examples
        ],
    }
    notes = (f"Measured by `benchmarks/smollm2_fspo.py` on {len(episodes)} episodes of users never seen in "
             f"training ({args.eval_episodes}), judged by each simulated user's exact reward.")  # fmt: skip
    write_model_card(fspo, card_results, notes)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
