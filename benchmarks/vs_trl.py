"""fspo's training step against TRL's `DPOTrainer` (loss_type "ipo") on the same work, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vs_trl.py \\
        --episodes runs/smollm2-reviews/episodes-k8 [--model FOLDER] [--contexts 1] [--reps 2]

Same model (SmolLM2-135M-Instruct unless ``--model``), same LoRA (one peft model: both trainers train
the very same adapter), same episodes (the first training batches of an episodes folder built with
``fspo data episodes --questions-per-context K``; 8 shots in the recipe), same preference pairs in
every step, same token ids (TRL's own collator receives fspo's tokenized prompt, chosen and rejected
answers, so neither tokenizer boundary nor template can differ), IPO at the same beta and learning
rate, gradient clipped alike. Three training steps are timed, interleaved within each repetition
(the order rotates, so load from elsewhere hits all alike); one optimizer step of the same pairs for
each, TRL accumulating gradients over micro-batches of ``--trl-micro-batch`` pairs (a whole
8-question step at once does not fit in 24 GiB):

* ``fspo``: `fspo.train.trainer.train_step`, the step `fspo train` runs, with the recipe's speed
  settings: the K questions of a user scored in one row after their shared shots
  (`fspo.infer.prefix`), reference log-probs from the cache built once before training (its cost
  per pair is measured on a fresh copy of the episodes, so no earlier run's cache is reused).
* ``trl``: `DPOTrainer.training_step` + optimizer step as TRL's defaults run it: every pair as two
  full sequences (prompt + chosen, prompt + rejected), the reference forward in every step (the
  adapter switched off).
* ``trl-precomputed``: the same with TRL's ``precompute_ref_log_probs`` path (reference values in
  the batch, no reference forward in the step; the values are fspo's cached ones, equal to what TRL's
  precompute pass computes).

Two ratios: **per episode of training** (one epoch: every step plus each pair's reference once),
fspo's step plus its cache cost per pair against TRL's step with its reference forward (TRL's
precompute pass does that same forward once per pair, so precomputing does not change TRL's total);
and **step only**, fspo's step against TRL's precomputed step (what each costs per epoch after the
first, when both have their reference values).

Before any timing, the loss of both on one shared batch: fspo with ``reduction: mean`` (average
log-prob per answer token, as TRL's IPO) against `DPOTrainer.compute_loss`, after the LoRA B
matrices are set to seeded random values (at peft's initialisation the policy equals the reference
and every IPO loss is exactly 1/(4 beta^2)). The script fails if they differ by more than 1e-4, or if
the loss is still 1/(4 beta^2).

Peak memory: in a second process (glibc told to return large blocks, MALLOC_MMAP_THRESHOLD_, so
resident memory tracks live tensors; not in the timed process, whose allocations it would slow),
one step of each after a warm-up, the peak resident set above the resident set before the step
(reset through /proc/self/clear_refs). CPU only, as every figure here.

TRL is a dev dependency (``pip install -e ".[dev]"``). Prints a table, then as its LAST line one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
SYSTEMS = ("fspo", "trl", "trl-precomputed")


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_mib(fn: Any) -> float:
    """Peak resident MiB of one call of `fn` above the resident set before it."""
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    fn()
    return max(0, _kib("VmHWM") - before) / 1024


def _trl_examples(units: list[Any], ref: dict[str, tuple[float, float]] | None) -> list[dict[str, Any]]:
    """TRL's pre-tokenized example rows for every pair of `units`, in fspo's order (with reference values
    for the precomputed path)."""
    rows = []
    for unit in units:
        for pair_id, pair in zip(unit.ids, unit.pairs(), strict=True):
            row = {"prompt_ids": list(pair.prompt), "chosen_ids": list(pair.chosen)}
            row["rejected_ids"] = list(pair.rejected)
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


def _fresh_episodes(src: str, dst: Path, lines: int) -> Path:
    """The first `lines` training episodes of `src` in a file of their own: a reference cache beside
    them is then built by this run, whatever an earlier run left beside `src`."""
    from fspo.data.episodes import episodes_file

    with episodes_file(src, "train").open(encoding="utf-8") as f:
        dst.write_text("".join(islice(f, lines)), encoding="utf-8")
    return dst


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", required=True, help="episodes (folder or file) built with K per context")
    ap.add_argument("--model", default=None, help="model folder (default: imported SmolLM2-135M-Instruct)")
    ap.add_argument("--k", type=int, default=8, help="questions per context (as the episodes were built)")
    ap.add_argument("--contexts", type=int, default=1, help="contexts per step (TRL gets their pairs)")
    ap.add_argument(
        "--trl-micro-batch",
        type=int,
        default=2,
        help="pairs per TRL forward (gradient accumulation up to the step's pairs): TRL holds every pair "
        "as two full sequences, ~4.6 GiB per pair of 8-shot episodes on this CPU",
    )
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="all-linear")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the second process
    return ap.parse_args()


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        bench = _Bench(args, Path(tmp), console)
        if args.memory_only:
            peaks = {name: bench.peak(name) for name in SYSTEMS}
            print(json.dumps(peaks))
            return
        loss = bench.loss_check()
        per_pair = bench.timings()
        cache = bench.cache
        start = bench.start
    failed = loss["abs_diff"] > 1e-4 or loss["moved"] < 1e-3

    console.print("peak memory: one step of each in a second process ...")
    child = subprocess.run(
        [sys.executable, *sys.argv, "--memory-only"], env={**os.environ, MMAP_ENV: str(1 << 20)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    peaks = json.loads(child.stdout.strip().splitlines()[-1])

    cache_s = cache["seconds"] / cache["computed"]
    total = {"fspo": per_pair["fspo"] + cache_s, "trl": per_pair["trl"]}
    result = {
        "model": bench.model_dir,
        "shots": start["render"].get("mean_shots_used"),
        "mean_prompt_tokens": start["render"].get("mean_prompt_tokens"),
        "questions_per_context": args.k,
        "pairs_per_step": bench.pairs_per_step[1:],
        "episodes_per_s_training": {n: round(1 / v, 4) for n, v in total.items()},
        "episodes_per_s_step_only": {n: round(1 / per_pair[n], 4) for n in SYSTEMS},
        "reference_cache_s_per_episode": round(cache_s, 4),
        "speedup_training": round(total["trl"] / total["fspo"], 2),
        "speedup_step_only": round(per_pair["trl-precomputed"] / per_pair["fspo"], 2),
        "peak_step_mib": peaks,
        "loss": loss,
        "loss_check": "failed" if failed else "passed",
        "reps": args.reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "trl": __import__("trl").__version__,
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    title = f"one IPO training step, {args.k} questions x {args.contexts} context(s) per step, CPU"
    table = Table(title=title)
    for col in (
        "system",
        "episodes/s, training (step + reference)",
        "episodes/s, step only",
        "peak step MiB",
    ):
        table.add_column(col)
    for n in SYSTEMS:
        trained = f"{1 / total[n]:.3f}" if n in total else "(= trl)"
        table.add_row(n, trained, f"{1 / per_pair[n]:.3f}", f"{peaks[n]:.0f}")
    console.print(table)
    console.print(
        f"fspo vs TRL: {result['speedup_training']}x per episode of training, {result['speedup_step_only']}x "
        f"per step with the reference precomputed; IPO loss on a shared batch: fspo {loss['fspo']:.6f}, "
        f"TRL {loss['trl']:.6f} (|diff| {loss['abs_diff']:.1e}) - {result['loss_check']}"
    )
    print(json.dumps(result))
    if failed:
        sys.exit(1)


class _Bench:
    """One fspo run (`setup`) and one `DPOTrainer` over the same peft model, and the three steps."""

    def __init__(self, args: argparse.Namespace, tmp: Path, console: Any):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from fspo.models.gguf_import import import_gguf
        from fspo.train.config import LoraConfig, TrainConfig
        from fspo.train.trainer import setup, step_batches

        self.args, self.console = args, console
        self.model_dir = args.model or str(import_gguf("smollm2-135m-instruct"))
        targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
        self.steps = 1 + args.warmup + args.reps  # step 0 is the shared batch of the loss check
        needed = (self.steps * args.contexts + 8) * args.k * 2  # the trainer reads ~1.05x what it steps
        cfg = TrainConfig(
            stage="fspo", model=self.model_dir, out=str(tmp / "fspo"), chat_template=True, loss="ipo",
            episodes=str(_fresh_episodes(args.episodes, tmp / "train.jsonl", needed)),
            beta=args.beta, reduction="mean", logps_impl="prefix", questions_per_context=args.k,
            batch_size=args.contexts, max_tokens=2048, lr=args.lr, warmup_steps=0, max_steps=self.steps,
            lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, target_modules=targets),
            reference_cache=True, progress=False, log_every=10_000,
        )  # fmt: skip
        self.cfg = cfg
        self.run = setup(cfg)
        self.start = json.loads((tmp / "fspo" / "metrics.jsonl").read_text().splitlines()[0])
        self.cache = self.start["reference"]["train"]
        if self.cache["computed"] == 0 or self.cache["reused"]:
            raise SystemExit(f"the reference cache was not built fresh: {self.cache}")
        self.step_batches = step_batches
        self.pairs_per_step = [sum(len(u.ids) for u in self.units(s)) for s in range(self.steps)]
        model = self.run.unwrapped
        trl_args = DPOConfig(
            output_dir=str(tmp / "trl"), loss_type=["ipo"], beta=args.beta, learning_rate=args.lr,
            per_device_train_batch_size=args.trl_micro_batch,
            gradient_accumulation_steps=-(-max(self.pairs_per_step) // args.trl_micro_batch),
            max_length=None, max_grad_norm=cfg.max_grad_norm, report_to=[], use_cpu=True, bf16=False,
            gradient_checkpointing=False, logging_steps=10_000,
        )  # fmt: skip
        unused = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # TRL needs one
        self.trainer = DPOTrainer(
            model=model, args=trl_args, train_dataset=unused, processing_class=self.run.tokenizer
        )
        # Handed a model that already has an adapter, TRL keeps a copy of it as its reference ("ref").
        # The adapter is fresh (peft's B = 0), so that copy is the base model at the cost of extra
        # LoRA matmuls; without it TRL takes the reference by switching the adapter off, as it does
        # when it adds the adapter itself (`peft_config`), and as fspo does.
        if "ref" in self.trainer.model.peft_config:
            self.trainer.model.delete_adapter("ref")
        self.trainer.create_optimizer()

    def units(self, step: int) -> list[Any]:
        return [self.run.units[i] for idx in self.step_batches(self.run, step) for i in idx]

    def loss_check(self) -> dict[str, float]:
        """Both losses on the batch of step 0, same weights, no update."""
        from fspo.train.trainer import batch_loss

        model, trainer = self.run.unwrapped, self.trainer
        _randomize_lora_b(model, seed=0)
        model.eval()
        with torch.no_grad():
            ours = float(batch_loss(self.run, self.units(0))[0])
            trainer.precompute_ref_logps = False
            batch = trainer.data_collator(_trl_examples(self.units(0), None))
            theirs = float(trainer.compute_loss(trainer.model, batch))
        model.train()
        at_init = 1 / (4 * self.args.beta**2)
        return {"fspo": ours, "trl": theirs, "abs_diff": abs(ours - theirs), "moved": abs(ours - at_init)}

    def step(self, name: str, step: int) -> None:
        from fspo.train.trainer import train_step

        if name == "fspo":
            train_step(self.run, step)
            return
        trainer, precomputed = self.trainer, name == "trl-precomputed"
        trainer.precompute_ref_logps = precomputed
        rows = _trl_examples(self.units(step), self.run.train_ref if precomputed else None)
        size = self.args.trl_micro_batch
        micro = [rows[i : i + size] for i in range(0, len(rows), size)]
        trainer.current_gradient_accumulation_steps = len(micro)  # set by `Trainer.train`'s loop
        for part in micro:
            trainer.training_step(trainer.model, trainer.data_collator(part))
        params = [p for p in self.run.unwrapped.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def timings(self) -> dict[str, float]:
        """Median seconds per pair of each system's step over `reps`, after `warmup` repetitions."""
        times: dict[str, list[float]] = {n: [] for n in SYSTEMS}
        for rep in range(self.args.warmup + self.args.reps):
            step = 1 + rep
            order = SYSTEMS[rep % len(SYSTEMS) :] + SYSTEMS[: rep % len(SYSTEMS)]
            for name in order:
                start = time.perf_counter()
                self.step(name, step)
                seconds = time.perf_counter() - start
                self.console.print(f"  rep {rep} {name}: {seconds:.1f} s, {self.pairs_per_step[step]} pairs")
                if rep >= self.args.warmup:
                    times[name].append(seconds / self.pairs_per_step[step])
        return {n: statistics.median(v) for n, v in times.items()}

    def peak(self, name: str) -> float:
        """Peak MiB of one step of `name` after one warm-up step of it."""
        self.step(name, 1)
        return round(_peak_mib(lambda: self.step(name, 2)), 1)


if __name__ == "__main__":
    main()
