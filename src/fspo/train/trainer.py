"""The one training loop, on accelerate, for both stages.

* ``sft``  – few-shot preference fine-tuning (Pref-FT): NLL of the chosen target given the episode
  prompt, target tokens only. With zero shots it is plain SFT (the population baseline).
* ``fspo`` – DPO or IPO against a frozen reference (the starting model, usually the SFT output).
  With zero shots it is the population IPO/DPO baseline.

`train` is `setup` (accelerate, model, data, reference, optimizer, scheduler, logging) followed by
the loop of `train_step`s (public, so that a benchmark times the very step training runs, e.g.
``benchmarks/vs_trl.py``). A batch's loss and metrics come from `_batch_loss`, the same function for
a training micro-batch and for the held-out set. Log-probs come from `fspo.infer.logps` / `fspo.infer.prefix`,
losses from `fspo.train.losses`, episodes from `fspo.data.episodes` tokenized by `fspo.train.data`
and grouped into contexts by `fspo.train.contexts`, batch order from `fspo.train.data` /
`fspo.train.buckets`, reference log-probs from `fspo.train.refcache`, checkpoints from
`fspo.train.checkpoint`.

The reference (the starting model; with LoRA the same model with its adapters disabled) is scored
once before training and cached beside the episodes (`reference_cache`, default), or in every step.
A batch is `batch_size` contexts; a context holds one episode, or with ``questions_per_context=K``
up to K episodes of one user sharing the same shots.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from fspo.core.errors import UserError
from fspo.core.files import AppendLog, atomic_write_json, atomic_write_text
from fspo.core.outputs import OutputFolder
from fspo.data.episodes import episodes_file, load_episodes
from fspo.data.tokens import pad_id_of
from fspo.infer import prefix
from fspo.infer.logps import collate_targets, compute_pair_logps, forward_logps
from fspo.infer.pairs import ContextTokens, QuestionTokens, SeqLogps
from fspo.train.buckets import epoch_batches
from fspo.train.card import CARD_FILE, SUMMARY_FILE, model_card
from fspo.train.checkpoint import (
    checkpoint_dir,
    drop_records_after,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fspo.train.config import CONFIG_FILE, TrainConfig
from fspo.train.contexts import Unit, group_examples, row_stats
from fspo.train.data import RenderStats, batch_order, check_descriptions, tokenize_episodes
from fspo.train.losses import preference_loss, sft_loss
from fspo.train.refcache import ReferenceCache, Values, model_fingerprint, reference_logps, sidecar_path

SCHEDULERS = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class TrainResult:
    out: Path
    model_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # last logged training metrics
    eval_metrics: dict[str, float] = field(default_factory=dict)  # final evaluation
    render_stats: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# A batch: log-probs, loss, metrics
# --------------------------------------------------------------------------------------------


def _score(cfg: TrainConfig, model: Any, units: list[Unit], pad_id: int) -> tuple[SeqLogps, SeqLogps]:
    """Chosen and rejected log-probs of every pair of `units`, in order, in one forward pass.

    ``concat`` is the two-sequence path (prompt+chosen and prompt+rejected as one 2B batch);
    ``prefix`` scores each context as one row (`fspo.infer.prefix`, plain fallback when the model
    cannot take a custom mask).
    """
    if cfg.logps_impl == "concat":
        return compute_pair_logps(model, [p for u in units for p in u.pairs()], pad_id)
    return prefix.pair_logps(model, [u.context for u in units], pad_id)


def _sft_context(ctx: ContextTokens) -> ContextTokens:
    """The context without rejected answers: SFT scores the chosen ones only."""
    return ContextTokens(ctx.shared, [QuestionTokens(q.question, q.chosen, ()) for q in ctx.items])


def _sft_logps(
    cfg: TrainConfig, model: Any, units: list[Unit], pad_id: int, spans: dict[str, Any] | None = None
) -> SeqLogps:
    """Chosen-answer log-probs. One question per row: the plain layout, as ever; K: shared rows.

    With `spans` (``shot_loss``) each row also scores its shots' preferred answers, so the sums and
    counts cover the query's answer and the shots' answers together.
    """
    if cfg.questions_per_context == 1:
        pairs = [p for u in units for p in u.pairs()]
        extra = [spans[i] for u in units for i in u.ids] if spans is not None else None
        return forward_logps(
            model,
            collate_targets([p.prompt for p in pairs], [p.chosen for p in pairs], pad_id, extra),
        )
    chosen, _ = prefix.pair_logps(model, [_sft_context(u.context) for u in units], pad_id)
    return chosen


def _cached_ref(
    values: Values, units: list[Unit], policy: tuple[SeqLogps, SeqLogps]
) -> tuple[SeqLogps, SeqLogps]:
    """The reference's summed log-probs of `units` from precomputed values (counts = the policy's)."""
    ids = [i for u in units for i in u.ids]
    dev = policy[0].sum.device
    chosen = torch.tensor([values[i][0] for i in ids], dtype=torch.float32, device=dev)
    rejected = torch.tensor([values[i][1] for i in ids], dtype=torch.float32, device=dev)
    return SeqLogps(chosen, policy[0].count), SeqLogps(rejected, policy[1].count)


def _fspo_losses(cfg: TrainConfig, policy: tuple[SeqLogps, SeqLogps], ref: tuple[SeqLogps, SeqLogps]) -> Any:
    r = cfg.reduction
    return preference_loss(
        cfg.loss,
        policy[0].reduce(r),
        policy[1].reduce(r),
        ref[0].reduce(r),
        ref[1].reduce(r),
        cfg.beta,
        cfg.label_smoothing,
    )


def _batch_loss(
    cfg: TrainConfig,
    chosen: SeqLogps,
    rejected: SeqLogps | None = None,
    ref: tuple[SeqLogps, SeqLogps] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss `cfg.stage` minimises on one batch of policy log-probs, and what is logged about it.

    SFT: the chosen answers' NLL per token. FSPO: the preference loss against the reference
    (`fspo.train.losses.preference_loss`) plus `nll_weight` times that NLL. Given the rejected
    answers' and the reference's log-probs (FSPO training; evaluation of either stage), the metrics
    also say how the policy ranks each pair: implicit-reward accuracy, margin and rewards, and plain
    log-prob accuracy. Training calls it per micro-batch, evaluation once on the whole held-out set.
    """
    if ref is None or rejected is None:  # SFT training: the chosen answers only
        loss = sft_loss(chosen.sum, chosen.count)
        return loss, {"loss": loss.detach()}
    pl = _fspo_losses(cfg, (chosen, rejected), ref)
    nll = sft_loss(chosen.sum, chosen.count)
    if cfg.stage == "sft":
        loss = nll
    elif cfg.nll_weight:
        loss = pl.loss + cfg.nll_weight * nll
    else:
        loss = pl.loss
    r = cfg.reduction
    return loss, {
        "loss": loss.detach(),
        "reward_accuracy": pl.accuracy,
        "margin": pl.margins.mean(),
        "chosen_reward": pl.chosen_rewards.mean(),
        "rejected_reward": pl.rejected_rewards.mean(),
        "chosen_nll": nll.detach(),
        "logp_accuracy": (chosen.reduce(r) > rejected.reduce(r)).float().mean(),
    }


class _Reference:
    """Per-step reference (``reference_cache=False``): a frozen copy, or the LoRA model with adapters off."""

    def __init__(self, model: Any, lora: bool):
        self.lora = lora
        self.copy = None if lora else copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def pair_logps(
        self, cfg: TrainConfig, unwrapped: Any, units: list[Unit], pad_id: int
    ) -> tuple[SeqLogps, SeqLogps]:
        if self.lora:
            was_training = unwrapped.training
            unwrapped.eval()
            with unwrapped.disable_adapter():
                out = _score(cfg, unwrapped, units, pad_id)
            unwrapped.train(was_training)
            return out
        return _score(cfg, self.copy, units, pad_id)


# --------------------------------------------------------------------------------------------
# Setup: model, data, reference, optimizer, logging
# --------------------------------------------------------------------------------------------


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


def _build_model(cfg: TrainConfig) -> tuple[Any, Any]:
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


def _optimizer(cfg: TrainConfig, model: Any) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _load_split(
    cfg: TrainConfig, path: str, split: str, tokenizer: Any, limit: int | None = None
) -> tuple[list[Unit], RenderStats, Path, dict[str, Any]]:
    """Episodes of `path` as contexts (`questions_per_context` per row at most), their render
    stats, the episodes file itself (where the reference cache goes), and with ``shot_loss`` the
    shots' answer positions per episode id (else empty)."""
    file = episodes_file(path, split)
    episodes = load_episodes(file, limit=limit)
    if not episodes:
        raise UserError(f"episodes file {file} is empty")
    options = cfg.template_options()
    check_descriptions(episodes, options, path)
    k = cfg.questions_per_context
    examples, stats = tokenize_episodes(
        episodes, tokenizer, options, cfg.shots, split_shared=k > 1, shot_spans=cfg.shot_loss
    )
    units = group_examples(examples, k)
    spans = {u.ids[0]: e.shot_spans for u, e in zip(units, examples, strict=True)} if cfg.shot_loss else {}
    return units, stats, file, spans


def _shared_rows(cfg: TrainConfig, model: Any) -> bool:
    """Whether the scorer really builds shared rows (prefix requested and the model can take them)."""
    return cfg.logps_impl == "prefix" and prefix.prefix_sharing_support(model)[0]


def _row_stats(cfg: TrainConfig, unit: Unit, shared: bool) -> tuple[int, int, int]:
    ctx = _sft_context(unit.context) if cfg.stage == "sft" else unit.context
    return row_stats(ctx, shared or (cfg.stage == "sft" and cfg.questions_per_context > 1))


def _padding(stats: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(real, padded) tokens of one batch: every row is padded to the longest row of the batch."""
    return sum(s[1] for s in stats), sum(s[0] for s in stats) * max(s[2] for s in stats)


def _reference_fingerprint(cfg: TrainConfig) -> str | None:
    """What identifies the reference for the cache; None = no cache (switched off, or the model is a
    hub id without a local folder to fingerprint: its values then live in memory for this run)."""
    if not cfg.reference_cache or not Path(cfg.model).is_dir():
        return None
    return model_fingerprint(cfg.model)


def _device_kind(device: torch.device) -> str:
    """The kind of processor a reference value was computed on: ``cpu``, or the GPU model's name."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _reference_values(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    units: list[Unit],
    file: Path,
    pad_id: int,
    model_fp: str | None,
) -> tuple[Values, dict[str, Any]]:
    """Reference log-probs of `units` from the starting model, computed once, cached under `model_fp`.

    Runs before training, so `model` still holds the starting weights; with LoRA its adapters are
    disabled. Every process takes part (each computes a share of what is missing, see
    `fspo.train.refcache.reference_logps`). Without `model_fp` nothing is read or saved.
    """
    from accelerate.utils import gather_object

    cache = None
    if model_fp is not None:
        key = {
            "template": cfg.template_options().model_dump(mode="json"),
            "mixed_precision": cfg.mixed_precision,
            # Other kernels give other floats: a GPU's values are not reused on the CPU, or the reverse.
            "device": _device_kind(accelerator.device),
        }
        cache = ReferenceCache(sidecar_path(file, model_fp, key), model_fp, key)
    start = time.perf_counter()
    lora = contextlib.nullcontext() if cfg.lora is None else model.disable_adapter()
    with lora:
        values, computed = reference_logps(
            model,
            units,
            pad_id,
            cache,
            batch_size=cfg.batch_size,
            shared=cfg.logps_impl == "prefix",
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            gather=gather_object,
            context=accelerator.autocast,
        )
    accelerator.wait_for_everyone()  # the cache file is complete before any process reads another
    info = {
        "cache": str(cache.path) if cache is not None else None,
        "computed": computed,
        "reused": len(values) - computed,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return values, info


class _BatchOrder:
    """The units of each micro-batch of this process: a pure function of (seed, epoch), hence resumable.

    Micro-batch m is batch ``m % batches_per_epoch`` of epoch ``m // batches_per_epoch``; the
    current epoch's batches are kept, the previous epoch's dropped.
    """

    def __init__(self, cfg: TrainConfig, lengths: list[int], batches_per_epoch: int, rank: int, world: int):
        self.cfg, self.lengths, self.batches_per_epoch = cfg, lengths, batches_per_epoch
        self.rank, self.world = rank, world
        self._epoch: dict[int, list[list[int]]] = {}

    def epoch(self, epoch: int) -> list[list[int]]:
        cfg = self.cfg
        if cfg.bucketed:
            return epoch_batches(self.lengths, cfg.batch_size, epoch, cfg.seed, self.rank, self.world)
        return batch_order(len(self.lengths), cfg.batch_size, epoch, cfg.seed, self.rank, self.world)

    def micro_batch(self, m: int) -> list[int]:
        epoch, b = divmod(m, self.batches_per_epoch)
        if epoch not in self._epoch:
            self._epoch = {epoch: self.epoch(epoch)}
        return self._epoch[epoch][b]


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
    units: list[Unit]
    rows: list[tuple[int, int, int]]  # `row_stats` per unit: (rows, real tokens, longest row)
    order: _BatchOrder
    stats: RenderStats
    shot_spans: dict[str, Any]
    train_ref: Values  # cached reference log-probs (FSPO with `reference_cache`), else empty
    reference: _Reference | None  # the per-step reference (FSPO without `reference_cache`)
    eval_units: list[Unit]
    eval_ref: Values
    total_steps: int
    start_step: int
    log: AppendLog | None = None  # metrics.jsonl, on the main process
    progress: Any = None  # a tqdm bar with `progress`, on the main process
    started: float = 0.0  # `time.perf_counter()` when `setup` began, for the card


def _train_split(
    cfg: TrainConfig, tokenizer: Any, world: int
) -> tuple[list[Unit], RenderStats, Path, dict[str, Any], int]:
    """`_load_split` of the training episodes, and the number of micro-batches in an epoch.

    A run bounded by max_steps reads only the episodes it will consume (the sampler already
    shuffled the file; 5% spare covers over-budget skips): rendering and tokenizing a 100k-episode
    file for a 1k-episode run would take longer than the run itself.
    """
    k = cfg.questions_per_context
    needed = None
    if cfg.max_steps:
        needed = (math.ceil(cfg.max_steps * cfg.batch_size * cfg.grad_accum * world * 1.05) + 8) * k
    units, stats, file, shot_spans = _load_split(cfg, cfg.episodes, "train", tokenizer, needed)
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
    return units, stats, file, shot_spans, batches_per_epoch


def setup(cfg: TrainConfig, resume: bool = False) -> Run:
    """Accelerate, the model, the data, the reference, optimizer and scheduler, a checkpoint to resume
    from, and the log's start record: everything before the first step, in an order that the seeded
    random state (LoRA initialisation, then dropout) depends on."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    started = time.perf_counter()
    out = Path(cfg.out)
    ckpt = latest_checkpoint(out)
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.mixed_precision,
            log_with=list(cfg.report_to) or None,
            project_dir=str(out),
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
    main = accelerator.is_main_process

    model, tokenizer = _build_model(cfg)
    pad_id = pad_id_of(tokenizer)
    world = accelerator.num_processes
    units, stats, train_file, shot_spans, batches_per_epoch = _train_split(cfg, tokenizer, world)
    if main:
        cfg.save(out / CONFIG_FILE)
        if stats.rejected_description_own:
            accelerator.print(
                f"RAT: {stats.rejected_description_own} of {stats.kept} training episodes do not say whom "
                "the rejected answer was written for; their rejected targets carry the user's own "
                "description, which then cancels in the preference margin"
            )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * (batches_per_epoch // cfg.grad_accum)))

    # Reference log-probs from the starting model, before any update: of the held-out set (for
    # evaluation, either stage), and of the training set (FSPO), or a per-step reference.
    eval_units: list[Unit] = []
    eval_ref: Values = {}
    ref_info: dict[str, Any] = {}
    model.to(accelerator.device)
    model_fp = _reference_fingerprint(cfg)
    if cfg.eval_episodes:
        eval_units, _, eval_file, _ = _load_split(
            cfg, cfg.eval_episodes, "test_unseen", tokenizer, cfg.eval_max_episodes
        )
        if eval_units:
            eval_ref, ref_info["eval"] = _reference_values(
                cfg, accelerator, model, eval_units, eval_file, pad_id, model_fp
            )
    train_ref: Values = {}
    reference = None
    if cfg.stage == "fspo" and cfg.reference_cache:
        train_ref, ref_info["train"] = _reference_values(
            cfg, accelerator, model, units, train_file, pad_id, model_fp
        )
    elif cfg.stage == "fspo":
        reference = _Reference(model, lora=cfg.lora is not None)

    optimizer = _optimizer(cfg, model)
    scheduler = get_scheduler(
        SCHEDULERS[cfg.scheduler],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step
    if reference is not None and reference.copy is not None:
        reference.copy.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)

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
    if cfg.report_to:
        accelerator.init_trackers("fspo", config={k: str(v) for k, v in cfg.model_dump().items()})

    shared = _shared_rows(cfg, unwrapped)
    rows = [_row_stats(cfg, u, shared) for u in units]
    run = Run(
        started=started,
        cfg=cfg,
        out=out,
        accelerator=accelerator,
        model=model,
        unwrapped=unwrapped,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        pad_id=pad_id,
        units=units,
        rows=rows,
        order=_BatchOrder(cfg, [r[2] for r in rows], batches_per_epoch, accelerator.process_index, world),
        stats=stats,
        shot_spans=shot_spans,
        train_ref=train_ref,
        reference=reference,
        eval_units=eval_units,
        eval_ref=eval_ref,
        total_steps=total_steps,
        start_step=start_step,
    )
    if main:
        run.log = AppendLog(out / "metrics.jsonl")
        run.log.append(_start_record(run, shared, ref_info))
        if cfg.progress:
            from tqdm.auto import tqdm

            run.progress = tqdm(
                total=total_steps, initial=start_step, desc=f"train {cfg.stage}", dynamic_ncols=True
            )
    return run


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


def _train_logps(
    run: Run, units: list[Unit]
) -> tuple[SeqLogps, SeqLogps | None, tuple[SeqLogps, SeqLogps] | None]:
    """Policy log-probs of one micro-batch (chosen; rejected and reference's in FSPO), for `_batch_loss`."""
    cfg, pad_id = run.cfg, run.pad_id
    if cfg.stage == "sft":
        spans = run.shot_spans if cfg.shot_loss else None
        return _sft_logps(cfg, run.model, units, pad_id, spans), None, None
    ref = run.reference.pair_logps(cfg, run.unwrapped, units, pad_id) if run.reference is not None else None
    policy = _score(cfg, run.model, units, pad_id)
    if ref is None:
        ref = _cached_ref(run.train_ref, units, policy)
    return policy[0], policy[1], ref


def batch_loss(run: Run, units: list[Unit]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch and its metrics, as `train_step` computes them."""
    return _batch_loss(run.cfg, *_train_logps(run, units))


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


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run one training stage as configured; returns where the final model folder is.

    `resume=True` continues from the latest complete checkpoint in ``cfg.out`` (or, saying so, starts
    from step 0 if there is none) of a run with the same settings. Without it, an ``out`` that holds a
    checkpoint or a finished model is refused, as is one holding another run's outputs (other
    settings), unless `overwrite`, which removes that run's outputs first.
    """
    folder = _output_folder(cfg, resume, overwrite)  # refused before anything loads
    # The main process keeps the run record (RANK is set by torchrun/accelerate launch; reading it
    # here, before the Accelerator exists, leaves the distributed setup to the Accelerator alone).
    main = int(os.environ.get("RANK", "0")) == 0
    with folder.writing() if main else contextlib.nullcontext():
        return _train(cfg, resume)


# What a run writes in its folder (`--overwrite` removes these, and nothing else): `fspo/` is the
# tensorboard tracker's, `.model.*` the final save's staging folders.
OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "model",
    ".model.tmp",
    ".model.old",
    SUMMARY_FILE,
    CONFIG_FILE,
    "fspo",
)
# Settings that change how a run is watched and saved, not what it trains: a resume may change them.
_NOT_THE_RUN = {"out", "progress", "report_to", "log_every", "eval_every", "save_every", "keep_checkpoints"}


def finished(cfg: TrainConfig) -> bool:
    """Whether ``cfg.out`` holds a finished run of these settings (fields that only change how a run is
    watched aside), i.e. one that `train(cfg, resume=True)` would only run again from its last
    checkpoint. Another run's outputs there are refused, as `train` refuses them."""
    return _run_folder(cfg).finished


def _run_folder(cfg: TrainConfig, overwrite: bool = False) -> OutputFolder:
    params = cfg.model_dump(mode="json", exclude=_NOT_THE_RUN)
    return OutputFolder(cfg.out, f"train {cfg.stage}", params, OUTPUTS, overwrite=overwrite, resumable=True)


def _output_folder(cfg: TrainConfig, resume: bool, overwrite: bool) -> OutputFolder:
    """The run folder under the output policy (`fspo.core.outputs`): a folder holding another run is
    refused without `overwrite`; one holding this run (same settings) is continued with `resume`,
    and refused without it once there is something to lose (a checkpoint or a finished model)."""
    folder = _run_folder(cfg, overwrite)
    if folder.continues and not resume and not overwrite:
        out = Path(cfg.out)
        ckpt = latest_checkpoint(out)
        if folder.finished or ckpt is not None:
            held = "a finished run" if folder.finished else f"a stopped run (checkpoint {ckpt.name})"  # type: ignore[union-attr]
            raise UserError(
                f"--out {out} holds {held} of these settings: pass --resume to continue it, "
                "--overwrite to train again from the start, or another --out"
            )
        folder.replace = True  # stopped before its first checkpoint: nothing to continue from
    return folder


def _train(cfg: TrainConfig, resume: bool) -> TrainResult:
    run = setup(cfg, resume)
    accelerator = run.accelerator
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
            last = {k: accelerator.reduce(v.to(accelerator.device), "mean").item() for k, v in sums.items()}
            last |= {"lr": run.scheduler.get_last_lr()[0], **window.rates(accelerator.num_processes)}
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            window = _Throughput()
            _log(run, done, last)
            if run.progress is not None:
                run.progress.set_postfix(
                    {k: f"{v:.3g}" for k, v in last.items() if k in ("loss", "reward_accuracy")}
                )
        if run.eval_units and cfg.eval_every and done % cfg.eval_every == 0 and done != run.total_steps:
            eval_metrics = _eval_and_log(run, done)
        if cfg.save_every and done % cfg.save_every == 0 and done != run.total_steps:
            save_checkpoint(
                accelerator, run.out, done, {"total_steps": run.total_steps}, cfg.keep_checkpoints
            )
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


def train_step(run: Run, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Optimizer step `step`: its micro-batches (`step_batches`) forward and backward, the gradient
    clipped, the optimizer and scheduler stepped. Returns the metrics averaged over the micro-batches
    (`_batch_loss`'s) and the gradient norm before clipping (None without `max_grad_norm`)."""
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


def _log(run: Run, step: int, metrics: dict[str, float]) -> None:
    """One line of metrics.jsonl (main process) and of every tracker in `report_to`."""
    if run.log is not None:
        run.log.append({"step": step, **metrics})
    run.accelerator.log(metrics, step=step)


def _eval_batches(cfg: TrainConfig, units: list[Unit]) -> list[list[Unit]]:
    """Evaluation batches: in file order, or sorted by length when batches are length-bucketed."""
    order = list(range(len(units)))
    if cfg.bucketed:
        order.sort(key=lambda i: len(units[i].context))
    return [[units[i] for i in order[j : j + cfg.batch_size]] for j in range(0, len(order), cfg.batch_size)]


def _evaluate(
    cfg: TrainConfig, model: Any, units: list[Unit], pad_id: int, ref: Values, autocast: Any
) -> dict[str, float]:
    """`_batch_loss` on the whole held-out set (reference = the starting model), as ``eval/`` metrics."""
    was_training = model.training
    model.eval()
    batches = _eval_batches(cfg, units)
    with torch.no_grad(), autocast():
        scored = [_score(cfg, model, batch, pad_id) for batch in batches]
    model.train(was_training)
    chosen, rejected = (
        SeqLogps(torch.cat([s[i].sum for s in scored]).float(), torch.cat([s[i].count for s in scored]))
        for i in (0, 1)
    )
    in_order = [u for batch in batches for u in batch]
    _, metrics = _batch_loss(cfg, chosen, rejected, _cached_ref(ref, in_order, (chosen, rejected)))
    return {**{f"eval/{k}": v.item() for k, v in metrics.items()}, "eval/episodes": float(len(chosen.sum))}


def _eval_and_log(run: Run, step: int) -> dict[str, float]:
    """Evaluate on the main process (the others wait), and log the result. Under FSDP every process
    runs the evaluation through the sharded model (its forward gathers weights from all of them)."""
    metrics: dict[str, float] = {}
    sharded = run.accelerator.distributed_type == DistributedType.FSDP
    if run.accelerator.is_main_process or sharded:
        model = run.model if sharded else run.unwrapped
        autocast = run.accelerator.autocast
        metrics = _evaluate(run.cfg, model, run.eval_units, run.pad_id, run.eval_ref, autocast)
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
        _save_final(run.cfg, run.unwrapped, run.tokenizer, run.out, model_dir, summary, state)
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


def _save_final(
    cfg: TrainConfig,
    unwrapped: Any,
    tokenizer: Any,
    out: Path,
    model_dir: Path,
    summary: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> None:
    """save_pretrained + tokenizer + fspo_config.json into a temp folder, then rename: all or nothing.

    A LoRA run also keeps its adapter (``adapter/``) but saves merged weights as the model, so every
    consumer loads it with `AutoModelForCausalLM` like any other model folder.
    """
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = unwrapped
    if cfg.lora is not None:
        unwrapped.save_pretrained(str(tmp / "adapter"))
        model = copy.deepcopy(unwrapped).merge_and_unload()
    model.save_pretrained(str(tmp), state_dict=state)
    tokenizer.save_pretrained(str(tmp))
    cfg.save(tmp / CONFIG_FILE)
    atomic_write_json(tmp / SUMMARY_FILE, summary)
    atomic_write_text(tmp / CARD_FILE, model_card(cfg, summary))
    old = out / ".model.old"
    shutil.rmtree(old, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(old)
    tmp.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_json(out / SUMMARY_FILE, summary)
