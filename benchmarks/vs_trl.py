"""fspo's training step against TRL's `DPOTrainer` (loss_type "ipo") on the same work, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vs_trl.py \\
        --episodes runs/smollm2-reviews/episodes-k8 [--model FOLDER] [--contexts 1] [--reps 3]

Same model (SmolLM2-135M-Instruct unless ``--model``), same LoRA (one peft model: both trainers train
the very same adapter), same episodes (the first training batches of an episodes folder built with
``fspo data episodes --questions-per-context K``; 8 shots in the recipe), same preference pairs in
every step, same token ids (TRL's own collator receives fspo's tokenized prompt, chosen and rejected
answers, so neither tokenizer boundary nor template can differ), IPO at the same beta and learning
rate, gradient clipped alike. Three training steps are timed, interleaved within each repetition
(the order rotates, so load from elsewhere hits all alike); one optimizer step of the same
pairs for each, TRL accumulating gradients over micro-batches of ``--trl-micro-batch`` pairs (a
whole 8-question step at once does not fit in 24 GiB):

* ``fspo``: `fspo.train.trainer.train_step`, the step `fspo train` runs, with the recipe's speed
  settings: the K questions of a user scored in one row after their shared shots
  (`fspo.infer.prefix`), reference log-probs from the cache built once before training. The cache's
  one-time cost is measured too and added per pair to fspo's figure ("with its cache").
* ``trl``: `DPOTrainer.training_step` + optimizer step as TRL's defaults run it: every pair as two
  full sequences (prompt + chosen, prompt + rejected), the reference forward in every step (the
  adapter switched off).
* ``trl-precomputed``: the same with TRL's ``precompute_ref_log_probs`` path (reference values in
  the batch; the step runs no reference forward). The values are fspo's cached ones, which equal what
  TRL's precompute pass would compute for these pairs; its one-time cost is the same as fspo's and
  is added alike.

Before any timing, the loss of both on one shared batch: fspo with ``reduction: mean`` (average
log-prob per answer token, as TRL's IPO) against `DPOTrainer.compute_loss`, after the LoRA B
matrices are set to seeded random values (at peft's initialisation the policy equals the reference
and every IPO loss is exactly 1/(4 beta^2), a comparison that cannot fail).

Peak memory: the step's own resident memory above what was resident before it (peak resident set
reset through /proc/self/clear_refs before every step; glibc told to return large blocks,
MALLOC_MMAP_THRESHOLD_, so resident memory tracks live tensors). CPU only, as every figure here.

TRL is a benchmark dependency only (``pip install -e ".[bench]"``). Prints a table, then as its LAST
line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measured(fn: Any) -> tuple[float, float]:
    """(seconds, peak MiB above the resident set before) of one call of `fn`."""
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, max(0, _kib("VmHWM") - before) / 1024


def _trl_examples(units: list[Any], ref: dict[str, tuple[float, float]] | None) -> list[dict[str, Any]]:
    """TRL's pre-tokenized example rows for every pair of `units`, in fspo's order (with reference values
    for the precomputed path)."""
    rows = []
    for unit in units:
        for pair_id, pair in zip(unit.ids, unit.pairs(), strict=True):
            row = {
                "prompt_ids": list(pair.prompt),
                "chosen_ids": list(pair.chosen),
                "rejected_ids": list(pair.rejected),
            }
            if ref is not None:
                row["ref_chosen_logps"], row["ref_rejected_logps"] = ref[pair_id]
            rows.append(row)
    return rows


def _randomize_lora_b(model: Any, seed: int) -> None:
    """Seeded non-zero LoRA B matrices of the trained adapter: the policy then differs from the reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--episodes", required=True, help="episodes folder or train file, built with K questions per context"
    )
    ap.add_argument(
        "--model", default=None, help="model folder (default: the imported SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--k", type=int, default=8, help="questions per context (as the episodes were built)")
    ap.add_argument("--contexts", type=int, default=1, help="contexts per step (TRL gets their pairs)")
    ap.add_argument(
        "--trl-micro-batch",
        type=int,
        default=2,
        help="pairs per TRL forward (gradient accumulation up to the step's pairs): TRL holds every pair as "
        "two full sequences and their logits at once, ~4.6 GiB per pair of 8-shot episodes on this CPU",
    )
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="all-linear")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if MMAP_ENV not in os.environ:  # must be set before the allocator starts: run again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP_ENV: str(1 << 20)})
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from rich.console import Console
    from rich.table import Table
    from trl import DPOConfig, DPOTrainer

    from fspo.models.gguf_import import import_gguf
    from fspo.train.config import LoraConfig, TrainConfig
    from fspo.train.trainer import batch_loss, setup, step_batches, train_step

    console = Console()
    model_dir = args.model or str(import_gguf("smollm2-135m-instruct"))
    targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    steps = 1 + args.warmup + args.reps  # step 0 is the shared batch of the loss check
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    cfg = TrainConfig(
        stage="fspo",
        model=model_dir,
        episodes=args.episodes,
        out=str(tmp / "fspo"),
        chat_template=True,
        loss="ipo",
        beta=args.beta,
        reduction="mean",
        logps_impl="prefix",
        questions_per_context=args.k,
        batch_size=args.contexts,
        max_tokens=2048,
        lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, target_modules=targets),
        lr=args.lr,
        warmup_steps=0,
        max_steps=steps,
        reference_cache=True,
        progress=False,
        log_every=10_000,
    )
    run = setup(cfg)
    start_record = json.loads((tmp / "fspo" / "metrics.jsonl").read_text().splitlines()[0])
    cache = start_record["reference"]["train"]
    cache_s_per_pair = cache["seconds"] / max(1, cache["computed"])
    model = run.unwrapped

    def units_of(step: int) -> list[Any]:
        return [run.units[i] for idx in step_batches(run, step) for i in idx]

    pairs_per_step = [sum(len(u.ids) for u in units_of(s)) for s in range(steps)]
    text = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # TRL needs one; unused
    trl_args = DPOConfig(
        output_dir=str(tmp / "trl"),
        loss_type=["ipo"],
        beta=args.beta,
        learning_rate=args.lr,
        per_device_train_batch_size=args.trl_micro_batch,
        gradient_accumulation_steps=-(-max(pairs_per_step) // args.trl_micro_batch),
        max_length=None,
        max_grad_norm=cfg.max_grad_norm,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataset_num_proc=None,
        logging_steps=10_000,
    )
    trainer = DPOTrainer(model=model, args=trl_args, train_dataset=text, processing_class=run.tokenizer)
    trl_model = trainer.model
    # Handed a model that already has an adapter, TRL keeps a copy of it as its reference ("ref").
    # Here the adapter is fresh (peft's B = 0), so that copy is the base model at the cost of extra
    # LoRA matmuls; without it TRL takes the reference by switching the adapter off, as it does when
    # it adds the adapter itself (`peft_config`), and as fspo does.
    if "ref" in trl_model.peft_config:
        trl_model.delete_adapter("ref")
    trainer.create_optimizer()
    collate = trainer.data_collator

    # The loss on a shared batch, same weights, no update.
    _randomize_lora_b(model, seed=0)
    model.eval()
    with torch.no_grad():
        fspo_loss = float(batch_loss(run, units_of(0))[0])
        trainer.precompute_ref_logps = False
        trl_loss = float(trainer.compute_loss(trl_model, collate(_trl_examples(units_of(0), None))))
    console.print(f"IPO loss on one shared batch: fspo {fspo_loss:.6f}, TRL {trl_loss:.6f}")
    model.train()

    def fspo_step(step: int) -> None:
        train_step(run, step)

    def trl_step(step: int, precomputed: bool) -> None:
        trainer.precompute_ref_logps = precomputed
        rows = _trl_examples(units_of(step), run.train_ref if precomputed else None)
        micro = [rows[i : i + args.trl_micro_batch] for i in range(0, len(rows), args.trl_micro_batch)]
        trainer.current_gradient_accumulation_steps = len(micro)
        for part in micro:
            trainer.training_step(trl_model, collate(part))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    systems = {
        "fspo": fspo_step,
        "trl": lambda s: trl_step(s, False),
        "trl-precomputed": lambda s: trl_step(s, True),
    }
    names = list(systems)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.warmup + args.reps):
        step = 1 + rep
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            seconds, peak = _measured(lambda name=name, step=step: systems[name](step))
            console.print(
                f"  rep {rep} {name}: {seconds:.1f} s, {pairs_per_step[step]} pairs, peak +{peak:.0f} MiB"
            )
            if rep >= args.warmup:
                times[name].append(seconds / pairs_per_step[step])
                peaks[name].append(peak)

    per_pair = {n: statistics.median(times[n]) for n in names}
    with_cache = {"fspo": per_pair["fspo"] + cache_s_per_pair, "trl": per_pair["trl"],
                  "trl-precomputed": per_pair["trl-precomputed"] + cache_s_per_pair}  # fmt: skip
    result = {
        "model": model_dir,
        "shots": start_record["render"].get("mean_shots_used"),
        "questions_per_context": args.k,
        "pairs_per_step": pairs_per_step[1:],
        "mean_prompt_tokens": start_record["render"].get("mean_prompt_tokens"),
        "episodes_per_s": {n: round(1 / with_cache[n], 4) for n in names},
        "episodes_per_s_step_only": {n: round(1 / per_pair[n], 4) for n in names},
        "reference_cache_s_per_episode": round(cache_s_per_pair, 4),
        "peak_step_mib": {n: round(max(peaks[n]), 1) for n in names},
        "speedup_vs_trl": round(with_cache["trl"] / with_cache["fspo"], 2),
        "speedup_vs_trl_precomputed": round(with_cache["trl-precomputed"] / with_cache["fspo"], 2),
        "loss": {"fspo": fspo_loss, "trl": trl_loss, "abs_diff": abs(fspo_loss - trl_loss)},
        "reps": args.reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "trl": __import__("trl").__version__,
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    table = Table(title=f"one IPO training step, {args.k} questions x {args.contexts} context(s), CPU")
    for col in ("system", "episodes/s (with its cache)", "episodes/s (step only)", "peak step MiB"):
        table.add_column(col)
    for n in names:
        table.add_row(n, f"{1 / with_cache[n]:.3f}", f"{1 / per_pair[n]:.3f}", f"{max(peaks[n]):.0f}")
    console.print(table)
    console.print(
        f"fspo vs TRL: {result['speedup_vs_trl']}x (TRL with precomputed reference: "
        f"{result['speedup_vs_trl_precomputed']}x); loss |diff| {result['loss']['abs_diff']:.2e}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
