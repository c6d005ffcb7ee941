"""Does a model read the user's shots? An in-context-learning probe for the embedded default model.

Why this exists: the quickstart's FSPO model did not beat the same model given no shots, so the
question is whether the small model learns in-context personalization *at all*, and from which
objective. This script fine-tunes a model on episodes of a simulated population with one of two
language-modelling objectives and measures how much the shots change its preference:

* ``target`` (the trainer's SFT stage): loss on the query's chosen answer only;
* ``shots`` (the trainer's ``--shot-loss``): loss also on every shot's preferred answer, each given
  the shots before it, the usual meta-learning trick of training every prefix of the sequence. It
  gives about (shots + 1) times the in-context signal per sequence at no extra compute.

Two engines run the same objective: ``trainer`` (default) is `fspo train sft` itself (its batch
order is a function of ``--seed``); ``loop`` is a plain AdamW loop over `model(..., labels=...)`
(clip 1, warmup 20, cosine) whose episode order is ``random.Random(--seed)``: kept because it is
how the order-dependence of the ``target`` objective was found (docs/research/in-context-copying.md).

The measure, per held-out episode: the shot effect ``[lp(c|S) - lp(r|S)] - [lp(c|0) - lp(r|0)]``
(log-probs summed over the answer); ``icl_effect_accuracy`` is the share of episodes where it is
positive, i.e. where the shots move the model towards the user's choice. 0.5 = the shots do nothing.
For populations that care about the answer's format it also prints P(answer starts with "- ") after
shots whose preferred answers are all bullets vs none.

    python benchmarks/icl_probe.py --model runs/quickstart/model/model --objective shots \\
        --sim-options '{"traits": ["format"], "min_traits": 1, "max_traits": 1}' --steps 300

``--episodes FOLDER`` probes existing episodes (e.g. the quickstart's) instead of simulating.
A finished SFT run of the same config in ``--work`` is reused (one of another config is refused).

Two more figures, to explain when copying can be learned at all (docs/research/copying-incentive.md):

* ``format_agreement`` (training episodes): among episodes whose shots all prefer the same format
  and whose query pair differs in format, the share whose chosen answer has the shots' format, and
  ``ln 2 - H(agreement)``, the most a model can gain (nats per such answer) by copying it;
* with ``--ipo-steps N``, IPO on top of the SFT model (reference = SFT) and its implicit-reward
  accuracy with 0 vs all shots on the held-out splits.
Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from fspo.data.episodes import build_episodes, load_episodes, write_episodes
from fspo.data.schema import Episode
from fspo.data.template import PREFERRED, TemplateOptions, render, response_heading
from fspo.eval import accuracy_curve
from fspo.infer.logps import score_targets
from fspo.models.loading import load_model, load_tokenizer
from fspo.sim import simulate
from fspo.train.config import CONFIG_FILE, TrainConfig, load_config
from fspo.train.tokenize import limit_shots
from fspo.train.trainer import train


def labelled(tokenizer, episode: Episode, options: TemplateOptions, shot_loss: bool) -> tuple[list, list]:
    """Ids of prompt + chosen target and labels: the target's tokens, plus every shot's preferred
    answer with ``shot_loss`` (found by searching the rendered prompt for each shot in order)."""
    r = render(episode, options)
    text = r.prompt + r.chosen
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = [(len(r.prompt) + len(PREFERRED), len(text))]
    if shot_loss:
        pos = 0
        for shot in episode.shots:
            piece = PREFERRED + shot.chosen.strip() + "\n"
            at = text.index(piece, pos)
            spans.append((at + len(PREFERRED), at + len(piece)))
            pos = at + len(piece)
    ids = [tokenizer.bos_token_id, *enc.input_ids, tokenizer.eos_token_id]
    labels = [-100] * len(ids)
    for k, (start, _) in enumerate(enc.offset_mapping, start=1):
        if any(a <= start < b for a, b in spans):
            labels[k] = ids[k]
    labels[-1] = ids[-1]
    return ids, labels


def finetune(
    model,
    tokenizer,
    episodes: list[Episode],
    steps: int,
    batch_size: int,
    lr: float,
    shot_loss: bool,
    seed: int = 0,
) -> None:
    options = TemplateOptions()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    order = list(range(len(episodes)))
    random.Random(seed).shuffle(order)
    model.train()
    for step in range(steps):
        rows = [
            labelled(tokenizer, episodes[order[(step * batch_size + i) % len(order)]], options, shot_loss)
            for i in range(batch_size)
        ]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = (labels != -100) | (ids != tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.eval()


@torch.no_grad()
def shot_effect(
    model, tokenizer, episodes: list[Episode], shots: int, options: TemplateOptions
) -> dict[str, float]:
    gaps = {}
    for k in (0, shots):
        rs = [render(limit_shots(e, k), options) for e in episodes]
        c = score_targets(model, tokenizer, [r.prompt for r in rs], [r.chosen for r in rs])
        r = score_targets(model, tokenizer, [r.prompt for r in rs], [r.rejected for r in rs])
        gaps[k] = c - r
    effect = gaps[shots] - gaps[0]
    return {
        "logp_accuracy_with_shots": float((gaps[shots] > 0).float().mean()),
        "logp_accuracy_no_shots": float((gaps[0] > 0).float().mean()),
        "icl_effect_accuracy": float((effect > 0).float().mean()),
        "episodes": len(episodes),
    }


@torch.no_grad()
def bullet_probe(model, tokenizer, episodes: list[Episode], options: TemplateOptions) -> dict[str, float]:
    """Mean P(first answer token is the bullet dash) after all-bullet vs no-bullet preferred shots."""
    dash = tokenizer.encode("- x", add_special_tokens=False)[0]
    groups: dict[str, list[float]] = {"all_bullets": [], "no_bullets": []}
    for e in episodes:
        n = sum(s.chosen.startswith("- ") for s in e.shots)
        if n not in (0, len(e.shots)):
            continue
        prompt = render(e, options).prompt + response_heading(options)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        p = model(ids).logits[0, -1].softmax(-1)[dash].item()
        groups["all_bullets" if n else "no_bullets"].append(p)
    return {f"p_dash_after_{k}": sum(v) / len(v) for k, v in groups.items() if v}


def format_agreement(episodes: list[Episode]) -> dict[str, float]:
    """How well the shots' format predicts the query's chosen format, and the copying incentive."""
    bullets = lambda text: text.lstrip().startswith("- ")  # noqa: E731
    agree = n = 0
    for e in episodes:
        k = sum(bullets(s.chosen) for s in e.shots)
        if e.shots and k in (0, len(e.shots)) and bullets(e.query.chosen) != bullets(e.query.rejected):
            n += 1
            agree += bullets(e.query.chosen) == (k > 0)
    a = agree / n if n else float("nan")
    entropy = -sum(q * math.log(q) for q in (a, 1 - a) if q > 0) if n else float("nan")
    return {"agreement": a, "n": n, "of": len(episodes), "max_gain_nats": math.log(2) - entropy}


def ipo_on_top(
    args: argparse.Namespace, sft_dir: Path, episodes: Path, work: Path, template: TemplateOptions
) -> dict[str, object]:
    """IPO from the SFT model (the reference), then the implicit-reward accuracy with 0 vs all shots.

    The trainer reads only the training episodes ``--ipo-steps`` consume, so the reference cache
    covers those, not the whole file."""
    result = train(
        TrainConfig(
            stage="fspo", loss="ipo", beta=args.beta, model=str(sft_dir),
            episodes=str(episodes / "train.jsonl"), out=str(work / "ipo"), lr=args.ipo_lr,
            scheduler="cosine", max_steps=args.ipo_steps,
            batch_size=args.batch_size, seed=args.seed, logps_impl="prefix", progress=False,
            include_dispreferred=template.include_dispreferred,
        )
    )  # fmt: skip
    held = {s: load_episodes(episodes, s)[: args.eval_episodes] for s in ("test_seen", "test_unseen")}
    curve = accuracy_curve(
        load_model(result.model_dir), load_tokenizer(result.model_dir), {k: v for k, v in held.items() if v},
        shots=(0, args.shots), ref_model=load_model(sft_dir), beta=args.beta, options=template,
    )  # fmt: skip
    accuracy = {
        split: {p["shots"]: round(p["accuracy"], 3) for p in points}
        for split, points in curve["splits"].items()
    }
    return {
        "steps": args.ipo_steps,
        "lr": args.ipo_lr,
        "beta": args.beta,
        "implicit_reward_accuracy": accuracy,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a pretrained model folder (e.g. the quickstart's)")
    ap.add_argument("--objective", choices=("target", "shots"), default="shots")
    ap.add_argument("--sim-options", default="{}", help="JSON options of the roleplay domain")
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--prefs", type=int, default=40)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-episodes", type=int, default=200)
    ap.add_argument("--engine", choices=("trainer", "loop"), default="trainer")
    ap.add_argument("--seed", type=int, default=0, help="batch order (trainer) / episode order (loop)")
    ap.add_argument("--episodes", help="an existing episodes folder (default: simulate --sim-options)")
    ap.add_argument("--work", default="runs/icl_probe")
    ap.add_argument(
        "--no-dispreferred",
        action="store_true",
        help="shots show only the preferred answer (trainer engine; template include_dispreferred=False)",
    )
    ap.add_argument("--ipo-steps", type=int, default=0, help="IPO steps on top of the SFT model (0 = none)")
    ap.add_argument("--ipo-lr", type=float, default=3e-4)
    ap.add_argument("--beta", type=float, default=0.1, help="IPO beta")
    ap.add_argument("--agreement-only", action="store_true", help="print format_agreement only (no training)")
    args = ap.parse_args()
    if (args.no_dispreferred or args.ipo_steps) and args.engine != "trainer":
        ap.error("--no-dispreferred and --ipo-steps need --engine trainer")
    template = TemplateOptions(include_dispreferred=not args.no_dispreferred)

    work = Path(args.work)
    options = json.loads(args.sim_options)
    episodes = Path(args.episodes) if args.episodes else work / "episodes"
    if not args.episodes:
        data = simulate("roleplay", args.users, args.prefs, seed=0, **options)
        splits = build_episodes(data.preferences, data.users, shots=args.shots, seed=0)
        write_episodes(episodes, splits, meta={"sim_options": options})
    if args.agreement_only:
        print(json.dumps({"episodes": str(episodes), **format_agreement(load_episodes(episodes, "train"))}))
        return
    start = time.perf_counter()
    if args.engine == "trainer":
        sft = TrainConfig(
            stage="sft", model=args.model, episodes=str(episodes), out=str(work / "sft"),
            shot_loss=args.objective == "shots", lr=args.lr, scheduler="cosine",
            max_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
            logps_impl="prefix", progress=False, include_dispreferred=template.include_dispreferred,
        )  # fmt: skip
        model_dir = work / "sft" / "model"
        if model_dir.exists():  # a finished run of this very config is reused, any other refused
            if load_config(work / "sft" / CONFIG_FILE) != sft:
                raise SystemExit(
                    f"{work / 'sft'} holds an SFT run of another config: delete it or pick --work"
                )
            print(f"reusing the finished SFT model in {work / 'sft'}", flush=True)
        else:
            model_dir = train(sft).model_dir
        model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    else:
        train_eps = load_episodes(episodes, "train")
        model, tokenizer = load_model(args.model), load_tokenizer(args.model)
        finetune(
            model, tokenizer, train_eps, args.steps, args.batch_size, args.lr,
            args.objective == "shots", args.seed,
        )  # fmt: skip
    figures: dict[str, object] = {
        "engine": args.engine,
        "objective": args.objective,
        "seed": args.seed,
        "episodes": str(episodes),
        "sim_options": options if not args.episodes else None,
        "steps": args.steps,
        "include_dispreferred": not args.no_dispreferred,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    for split in ("test_seen", "test_unseen"):
        held_out = load_episodes(episodes, split)[: args.eval_episodes]
        if held_out:
            figures[split] = {
                **shot_effect(model, tokenizer, held_out, args.shots, template),
                **bullet_probe(model, tokenizer, held_out, template),
            }
            print(split, figures[split], flush=True)
    figures["format_agreement"] = format_agreement(load_episodes(episodes, "train"))
    print("format_agreement", figures["format_agreement"], flush=True)
    if args.ipo_steps:
        figures["ipo"] = ipo_on_top(args, work / "sft" / "model", episodes, work, template)
        print("ipo", figures["ipo"], flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
