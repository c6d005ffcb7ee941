"""The one training loop, on accelerate, for both stages (`fspo.train.objective`: what each minimises).

`train` is `setup` followed by the loop of `train_step`s (public, so that a benchmark times the very
step training runs, e.g. ``benchmarks/vs_trl.py``). `setup` is built from named parts, in the order
the seeded random state depends on (LoRA initialisation, then dropout): `_setup_accelerator`,
`_setup_model`, `_setup_data`, `_setup_eval` and `_setup_reference` (the starting model's log-probs,
before any update), `_setup_optimizer`, `_setup_scheduler`, `_setup_resume` and `_setup_logging`.

A batch's loss and metrics come from the run's `Objective` (`batch_loss`), the same function for a
training micro-batch and for the held-out set (`fspo.train.evaluation`). Episodes come from
`fspo.data.episodes`, tokenized by `fspo.train.tokenize` and grouped into contexts by
`fspo.train.contexts`; a batch is `batch_size` contexts (one episode, or with
``questions_per_context=K`` up to K episodes of one user sharing the same shots), in the order of
`fspo.train.buckets`; log-probs from `fspo.train.scoring`, the reference's from
`fspo.train.reference`; checkpoints from `fspo.train.checkpoint`, the output folder and final
model from `fspo.train.run_folder`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from fspo.core.errors import UserError
from fspo.core.files import AppendLog
from fspo.data.tokens import pad_id_of
from fspo.infer import prefix
from fspo.train.buckets import BatchOrder
from fspo.train.checkpoint import (
    checkpoint_dir,
    drop_records_after,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fspo.train.config import CONFIG_FILE, TrainConfig
from fspo.train.contexts import Unit, load_contexts, row_stats
from fspo.train.evaluation import evaluate
from fspo.train.objective import Objective, objective_for
from fspo.train.refcache import Values
from fspo.train.reference import CachedReference, StepReference, reference_fingerprint, reference_values
from fspo.train.run_folder import output_folder, run_folder, save_model_folder
from fspo.train.tokenize import RenderStats

SCHEDULERS = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class TrainResult:
    out: Path
    model_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # last logged training metrics
    eval_metrics: dict[str, float] = field(default_factory=dict)  # final evaluation
    render_stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What the loop works with, built once by `setup`."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    model: Any  # as prepared by accelerate (wrapped in DDP when there are several processes)
    unwrapped: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pad_id: int
    objective: Objective
    reference: CachedReference | StepReference | None  # the training reference (FSPO), else None
    units: list[Unit]
    rows: list[tuple[int, int, int]]  # `Objective.row_stats` per unit: (rows, real tokens, longest row)
    order: BatchOrder
    stats: RenderStats
    eval_units: list[Unit]
    eval_ref: Values
    total_steps: int
    start_step: int
    log: AppendLog | None = None  # metrics.jsonl, on the main process
    progress: Any = None  # a tqdm bar with `progress`, on the main process
    started: float = 0.0  # `time.perf_counter()` when `setup` began, for the card

    @property
    def train_ref(self) -> Values:
        """The training episodes' cached reference log-probs (FSPO with `reference_cache`), else empty."""
        return self.reference.values if isinstance(self.reference, CachedReference) else {}


# --------------------------------------------------------------------------------------------
# Setup, in named parts
# --------------------------------------------------------------------------------------------


def _setup_accelerator(cfg: TrainConfig) -> Any:
    """The Accelerator of this config, and the run's seed set."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.mixed_precision,
            log_with=list(cfg.report_to) or None,
            project_dir=str(Path(cfg.out)),
        )
    except (ImportError, ValueError) as err:
        raise UserError(f"cannot set up accelerate with this config: {err}") from None
    set_seed(cfg.seed)
    if accelerator.distributed_type == DistributedType.FSDP and cfg.lora is not None:
        # The final save merges the adapter in a copy of the model, which a sharded model cannot give.
        raise UserError(
            "LoRA under FSDP is not supported: a LoRA run of a 3B model fits one GPU, so use data "
            "parallelism (configs/accelerate/ddp.yaml) or train without lora"
        )
    return accelerator


def _check_lora_targets(model: Any, model_id: str, targets: list[str]) -> None:
    """Each LoRA target must name a module of `model` (peft matches a name or a dotted suffix of one);
    peft's own error for a typo is a traceback that does not say which names exist."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in modules)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules if not any(m.children())})
        raise UserError(
            f"--lora-target-modules: {', '.join(missing)} not found in model {model_id!r}; "
            f"its layers are named: {', '.join(leaves)} (or use all-linear)"
        )


def _setup_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """The starting model (with fresh LoRA adapters when asked) and its tokenizer."""
    from fspo.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        if not isinstance(cfg.lora.target_modules, str):
            _check_lora_targets(model, cfg.model, list(cfg.lora.target_modules))

        model = get_peft_model(
            model,
            LoraConfig(
                task_type="CAUSAL_LM",
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
            ),
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            model.enable_input_require_grads()
    return model, tokenizer


@dataclass
class _TrainData:
    units: list[Unit]
    stats: RenderStats
    file: Path  # the training episodes file (its reference cache sits beside it)
    shot_spans: dict[str, Any]
    batches_per_epoch: int  # micro-batches of this process in one epoch


def _setup_data(cfg: TrainConfig, accelerator: Any, tokenizer: Any) -> _TrainData:
    """`load_contexts` of the training episodes and the number of micro-batches in an epoch; the main
    process then saves the run's config (it is valid: the data loaded) and says what RAT cannot do.

    A run bounded by max_steps reads only the episodes it will consume (the sampler already
    shuffled the file; 5% spare covers over-budget skips): rendering and tokenizing a 100k-episode
    file for a 1k-episode run would take longer than the run itself.
    """
    k, world = cfg.questions_per_context, accelerator.num_processes
    needed = None
    if cfg.max_steps:
        needed = (math.ceil(cfg.max_steps * cfg.batch_size * cfg.grad_accum * world * 1.05) + 8) * k
    units, stats, file, shot_spans = load_contexts(cfg, cfg.episodes, "train", tokenizer, needed)
    if not units:
        raise UserError(
            f"no training episode fits max_tokens={cfg.max_tokens} (all {stats.episodes} are over budget)"
        )
    batches_per_epoch = len(units) // (cfg.batch_size * world)
    if batches_per_epoch // cfg.grad_accum == 0:
        raise UserError(
            f"{len(units)} usable {'contexts' if k > 1 else 'episodes'} are fewer than one optimizer step "
            f"needs (batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes)"
        )
    if accelerator.is_main_process:
        cfg.save(Path(cfg.out) / CONFIG_FILE)
        if stats.rejected_description_own:
            accelerator.print(
                f"RAT: {stats.rejected_description_own} of {stats.kept} training episodes do not say whom "
                "the rejected answer was written for; their rejected targets carry the user's own "
                "description, which then cancels in the preference margin"
            )
        if stats.shots_dropped or stats.over_budget:  # else said only in metrics.jsonl's render stats
            accelerator.print(
                f"max_tokens {cfg.max_tokens}: {stats.episodes_with_dropped_shots} of {stats.episodes} "
                f"training episodes lost {stats.shots_dropped} shots to fit and {stats.over_budget} did not "
                "fit at all (skipped); a very long answer does this: raise max_tokens or shorten it"
            )
    return _TrainData(units, stats, file, shot_spans, batches_per_epoch)


def _setup_eval(
    cfg: TrainConfig, accelerator: Any, model: Any, tokenizer: Any, pad_id: int, model_fp: str | None
) -> tuple[list[Unit], Values, dict[str, Any] | None]:
    """The held-out contexts (either stage) and their reference values from the starting model, with
    what the log says about those; nothing without ``eval_episodes``."""
    if not cfg.eval_episodes:
        return [], {}, None
    units, _, file, _ = load_contexts(cfg, cfg.eval_episodes, "test_unseen", tokenizer, cfg.eval_max_episodes)
    if not units:
        return [], {}, None
    values, info = reference_values(cfg, accelerator, model, units, file, pad_id, model_fp)
    return units, values, info


def _setup_reference(
    cfg: TrainConfig,
    objective: Objective,
    accelerator: Any,
    model: Any,
    data: _TrainData,
    pad_id: int,
    model_fp: str | None,
) -> tuple[CachedReference | StepReference | None, dict[str, Any] | None]:
    """The training reference, taken from `model` before any update: its values computed once
    (`reference_cache`) or a per-step reference; None when the objective needs none."""
    if not objective.needs_reference:
        return None, None
    if not cfg.reference_cache:
        return StepReference(cfg, model, pad_id), None
    values, info = reference_values(cfg, accelerator, model, data.units, data.file, pad_id, model_fp)
    return CachedReference(values), info


def _setup_optimizer(cfg: TrainConfig, model: Any) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _setup_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULERS[cfg.scheduler],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=total_steps,
    )


def _setup_resume(cfg: TrainConfig, accelerator: Any, resume: bool, total_steps: int) -> int:
    """The step to start from: the latest complete checkpoint's (its state loaded), else 0. A resumed
    run's log loses what the killed run wrote after that checkpoint (those steps run again)."""
    out, main = Path(cfg.out), accelerator.is_main_process
    ckpt = latest_checkpoint(out)
    start_step = 0
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt)
        start_step = int(state["step"])
        if main:
            accelerator.print(f"resuming from {ckpt} at step {start_step}/{total_steps}")
    elif resume and main:
        # Said, not refused: a job script may pass --resume on its first start as on every restart.
        accelerator.print(f"no checkpoint in {checkpoint_dir(out)}: starting from step 0")
    if resume and main:
        drop_records_after(out / "metrics.jsonl", start_step)
    return start_step


def _shared_rows(cfg: TrainConfig, model: Any) -> bool:
    """Whether the scorer really builds shared rows (prefix requested and the model can take them)."""
    return cfg.logps_impl == "prefix" and prefix.prefix_sharing_support(model)[0]


def setup(cfg: TrainConfig, resume: bool = False) -> Run:
    """Accelerate, the model, the data, the reference, optimizer and scheduler, a checkpoint to resume
    from, and the log's start record: everything before the first step, in an order that the seeded
    random state (LoRA initialisation, then dropout) depends on."""
    started = time.perf_counter()
    accelerator = _setup_accelerator(cfg)
    model, tokenizer = _setup_model(cfg)
    pad_id = pad_id_of(tokenizer)
    data = _setup_data(cfg, accelerator, tokenizer)
    objective = objective_for(cfg, data.shot_spans)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * (data.batches_per_epoch // cfg.grad_accum)))

    model.to(accelerator.device)
    model_fp = reference_fingerprint(cfg)
    eval_units, eval_ref, eval_info = _setup_eval(cfg, accelerator, model, tokenizer, pad_id, model_fp)
    reference, train_info = _setup_reference(cfg, objective, accelerator, model, data, pad_id, model_fp)
    ref_info = {k: v for k, v in (("eval", eval_info), ("train", train_info)) if v is not None}

    optimizer = _setup_optimizer(cfg, model)
    scheduler = _setup_scheduler(cfg, optimizer, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step
    unwrapped = accelerator.unwrap_model(model)
    start_step = _setup_resume(cfg, accelerator, resume, total_steps)

    shared = _shared_rows(cfg, unwrapped)
    rows = [objective.row_stats(u, shared) for u in data.units]
    lengths = [r[2] for r in rows]
    order = BatchOrder(
        lengths, cfg.batch_size, cfg.seed, cfg.bucketed, data.batches_per_epoch,
        accelerator.process_index, accelerator.num_processes,
    )  # fmt: skip
    run = Run(
        cfg=cfg, out=Path(cfg.out), accelerator=accelerator, model=model, unwrapped=unwrapped,
        tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, pad_id=pad_id,
        objective=objective, reference=reference, units=data.units, rows=rows, order=order,
        stats=data.stats, eval_units=eval_units, eval_ref=eval_ref, total_steps=total_steps,
        start_step=start_step, started=started,
    )  # fmt: skip
    _setup_logging(run, shared, ref_info)
    return run


def _padding(stats: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(real, padded) tokens of one batch: every row is padded to the longest row of the batch."""
    return sum(s[1] for s in stats), sum(s[0] for s in stats) * max(s[2] for s in stats)


def _setup_logging(run: Run, shared: bool, ref_info: dict[str, Any]) -> None:
    """The trackers of `report_to`; on the main process metrics.jsonl (its start record) and the bar."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.report_to:
        accelerator.init_trackers("fspo", config={k: str(v) for k, v in cfg.model_dump().items()})
    if not accelerator.is_main_process:
        return
    run.log = AppendLog(run.out / "metrics.jsonl")
    run.log.append(_start_record(run, shared, ref_info))
    if cfg.progress:
        from tqdm.auto import tqdm

        run.progress = tqdm(
            total=run.total_steps, initial=run.start_step, desc=f"train {cfg.stage}", dynamic_ncols=True
        )


def _start_record(run: Run, shared: bool, ref_info: dict[str, Any]) -> dict[str, Any]:
    """The log's first line: what this run trains on, how its rows are laid out, its reference."""
    pairs = sum(len(u.ids) for u in run.units)
    first = [_padding([run.rows[i] for i in b]) for b in run.order.epoch(0)]
    return {
        "event": "start",
        "step": run.start_step,
        "total_steps": run.total_steps,
        "processes": run.accelerator.num_processes,
        "distributed": str(run.accelerator.distributed_type.value),
        "train_examples": pairs,
        "contexts": len(run.units),
        "questions_per_context": pairs / len(run.units),
        "group_by_length": run.cfg.bucketed,
        "shared_rows": shared,
        "epoch0_padding_fraction": 1 - sum(r for r, _ in first) / max(1, sum(p for _, p in first)),
        "reference": ref_info,
        "render": run.stats.summary(),
        "trainable_parameters": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
    }


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run one training stage as configured; returns where the final model folder is.

    `resume=True` continues from the latest complete checkpoint in ``cfg.out`` (or, saying so, starts
    from step 0 if there is none) of a run with the same settings. Without it, an ``out`` that holds a
    checkpoint or a finished model is refused, as is one holding another run's outputs (other
    settings), unless `overwrite`, which removes that run's outputs first.
    """
    folder = output_folder(cfg, resume, overwrite)  # refused before anything loads
    # The main process keeps the run record (RANK is set by torchrun/accelerate launch; reading it
    # here, before the Accelerator exists, leaves the distributed setup to the Accelerator alone).
    main = int(os.environ.get("RANK", "0")) == 0
    with folder.writing() if main else contextlib.nullcontext():
        return _train(cfg, resume)


def finished(cfg: TrainConfig) -> bool:
    """Whether ``cfg.out`` holds a finished run of these settings (fields that only change how a run is
    watched aside), i.e. one that `train(cfg, resume=True)` would only run again from its last
    checkpoint. Another run's outputs there are refused, as `train` refuses them."""
    return run_folder(cfg).finished


def _due(every: int, done: int, total: int) -> bool:
    """Whether a periodic action (evaluation, checkpoint; `every` 0 = never) falls after step `done`.
    The last step has its own (the final evaluation, the model folder)."""
    return every > 0 and done % every == 0 and done != total


def _train(cfg: TrainConfig, resume: bool) -> TrainResult:
    run = setup(cfg, resume)
    run.model.train()
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    window = _Throughput()
    for step in range(run.start_step, run.total_steps):
        for idx in step_batches(run, step):
            window.add(run, idx)
        sums, grad_norm = train_step(run, step)
        done = step + 1
        if done % cfg.log_every == 0 or done == run.total_steps:
            last = _log_step(run, done, sums, grad_norm, window)
            window = _Throughput()
        if run.eval_units and _due(cfg.eval_every, done, run.total_steps):
            eval_metrics = _eval_and_log(run, done)
        if _due(cfg.save_every, done, run.total_steps):
            state = {"total_steps": run.total_steps}
            save_checkpoint(run.accelerator, run.out, done, state, cfg.keep_checkpoints)
        if run.progress is not None:
            run.progress.update(1)
    if run.progress is not None:
        run.progress.close()
    if run.eval_units:
        eval_metrics = _eval_and_log(run, run.total_steps)
    return _finish(run, last, eval_metrics)


def step_batches(run: Run, step: int) -> list[list[int]]:
    """The units (indices into `run.units`) of each micro-batch of optimizer step `step`."""
    ga = run.cfg.grad_accum
    return [run.order.micro_batch(step * ga + a) for a in range(ga)]


def batch_loss(run: Run, units: list[Unit]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch and its metrics, as `train_step` computes them."""
    objective = run.objective
    return objective.loss(objective.train_logps(run.model, units, run.pad_id, run.reference))


def train_step(run: Run, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Optimizer step `step`: its micro-batches (`step_batches`) forward and backward, the gradient
    clipped, the optimizer and scheduler stepped. Returns the metrics averaged over the micro-batches
    (`batch_loss`'s) and the gradient norm before clipping (None without `max_grad_norm`)."""
    cfg, accelerator = run.cfg, run.accelerator
    sums: dict[str, torch.Tensor] = {}
    batches = step_batches(run, step)
    for a, idx in enumerate(batches):
        sync = contextlib.nullcontext() if a == len(batches) - 1 else accelerator.no_sync(run.model)
        with sync, accelerator.autocast():
            loss, metrics = batch_loss(run, [run.units[i] for i in idx])
            accelerator.backward(loss / cfg.grad_accum)
        for name, v in metrics.items():
            sums[name] = sums.get(name, 0) + v.detach().float() / cfg.grad_accum
    grad_norm = None
    if cfg.max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


# --------------------------------------------------------------------------------------------
# Logging, evaluation, the end
# --------------------------------------------------------------------------------------------


@dataclass
class _Throughput:
    """Work done since the last log line, for tokens/s, pairs/s and the padding fraction."""

    tokens: int = 0  # in plain-path tokens (2 x prompt + both answers per pair), whatever the path
    pairs: int = 0
    real: int = 0
    padded: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, run: Run, idx: list[int]) -> None:
        real, padded = _padding([run.rows[i] for i in idx])
        self.real += real
        self.padded += padded
        self.pairs += sum(len(run.units[i].ids) for i in idx)
        self.tokens += sum(row_stats(run.units[i].context, False)[1] for i in idx)

    def rates(self, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "tokens_per_s": self.tokens * world / elapsed,
            "pairs_per_s": self.pairs * world / elapsed,
            "padding_fraction": 1 - self.real / max(1, self.padded),
        }


def _log_step(
    run: Run, done: int, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, window: _Throughput
) -> dict[str, float]:
    """Log the metrics of step `done` (averaged over processes) with the rates since the last line."""
    accelerator = run.accelerator
    last = {k: accelerator.reduce(v.to(accelerator.device), "mean").item() for k, v in sums.items()}
    last |= {"lr": run.scheduler.get_last_lr()[0], **window.rates(accelerator.num_processes)}
    if grad_norm is not None:
        last["grad_norm"] = float(grad_norm)
    _log(run, done, last)
    if run.progress is not None:
        run.progress.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k in ("loss", "reward_accuracy")})
    return last


def _log(run: Run, step: int, metrics: dict[str, float]) -> None:
    """One line of metrics.jsonl (main process) and of every tracker in `report_to`."""
    if run.log is not None:
        run.log.append({"step": step, **metrics})
    run.accelerator.log(metrics, step=step)


def _eval_and_log(run: Run, step: int) -> dict[str, float]:
    """Evaluate on the main process (the others wait), and log the result. Under FSDP every process
    runs the evaluation through the sharded model (its forward gathers weights from all of them)."""
    metrics: dict[str, float] = {}
    sharded = run.accelerator.distributed_type == DistributedType.FSDP
    if run.accelerator.is_main_process or sharded:
        model = run.model if sharded else run.unwrapped
        autocast = run.accelerator.autocast
        metrics = evaluate(run.objective, model, run.eval_units, run.pad_id, run.eval_ref, autocast)
    if run.accelerator.is_main_process:
        _log(run, step, metrics)
    run.accelerator.wait_for_everyone()
    return metrics


def _finish(run: Run, last: dict[str, float], eval_metrics: dict[str, float]) -> TrainResult:
    """Save the final model, close the log, and release accelerate on every process."""
    accelerator = run.accelerator
    model_dir = run.out / "model"
    summary = {
        "steps": run.total_steps,
        "metrics": last,
        "eval": eval_metrics,
        "render": run.stats.summary(),
        "seconds": round(time.perf_counter() - run.started, 1),
        "processes": accelerator.num_processes,
    }
    # Every process takes part: under FSDP this gathers the sharded weights (FULL_STATE_DICT, the
    # main process gets them); otherwise it is the unwrapped model's own state dict.
    state = accelerator.get_state_dict(run.model) if run.cfg.lora is None else None
    if accelerator.is_main_process:
        save_model_folder(run.cfg, run.unwrapped, run.tokenizer, run.out, model_dir, summary, state)
    accelerator.wait_for_everyone()
    if run.log is not None:
        run.log.append({"event": "end", "step": run.total_steps, **eval_metrics})
        run.log.close()
    # Drop the DDP wrapper (its reducer holds the process group) on every process while all are
    # still here: freed after `end_training`, it sometimes waited forever for a peer that had exited.
    del run.model, run.optimizer
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run.out, model_dir, run.total_steps, last, eval_metrics, run.stats.summary())
