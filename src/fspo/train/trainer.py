"""The one training loop, on accelerate, for both stages.

* ``sft``  – few-shot preference fine-tuning (Pref-FT): NLL of the chosen target given the episode
  prompt, target tokens only. With zero shots it is plain SFT (the population baseline).
* ``fspo`` – DPO or IPO against a frozen reference (the starting model, usually the SFT output).
  With zero shots it is the population IPO/DPO baseline.

The loop only orchestrates: log-probs come from `fspo.train.logps`, losses from
`fspo.train.losses`, batches from `fspo.train.data`, checkpoints from `fspo.train.checkpoint`.
With LoRA the reference is the same model with its adapters disabled (no second copy).
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fspo.errors import UserError
from fspo.files import AppendLog, atomic_write_json
from fspo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fspo.train.config import CONFIG_FILE, TrainConfig
from fspo.train.data import (
    PairExample,
    batch_order,
    check_descriptions,
    load_episodes,
    make_batch,
    tokenize_episodes,
)
from fspo.train.logps import PairBatch, SeqLogps, collate_targets, forward_logps, pair_logps_fn
from fspo.train.losses import preference_loss, sft_loss

SCHEDULERS = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class TrainResult:
    out: Path
    model_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # last logged training metrics
    eval_metrics: dict[str, float] = field(default_factory=dict)  # final evaluation
    render_stats: dict[str, Any] = field(default_factory=dict)


class _Reference:
    """Log-probs under the frozen reference: a frozen copy, or the LoRA model with adapters off."""

    def __init__(self, model: Any, lora: bool):
        self.lora = lora
        self.copy = None if lora else copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def pair_logps(self, unwrapped: Any, fn: Any, batch: PairBatch) -> tuple[SeqLogps, SeqLogps]:
        if self.lora:
            was_training = unwrapped.training
            unwrapped.eval()
            with unwrapped.disable_adapter():
                out = fn(unwrapped, batch)
            unwrapped.train(was_training)
            return out
        return fn(self.copy, batch)


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


def _build_model(cfg: TrainConfig) -> tuple[Any, Any]:
    from fspo.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

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


def _load_split(cfg: TrainConfig, path: str, split: str, tokenizer: Any, limit: int | None = None):
    episodes = load_episodes(path, split)
    if limit is not None:
        episodes = episodes[:limit]
    options = cfg.template_options()
    check_descriptions(episodes, options, path)
    return tokenize_episodes(episodes, tokenizer, options, cfg.shots)


@torch.no_grad()
def _eval_logps(model: Any, fn: Any, examples: list[PairExample], tokenizer: Any, bs: int) -> list[tuple]:
    out = []
    for i in range(0, len(examples), bs):
        out.append(fn(model, make_batch(examples[i : i + bs], tokenizer)))
    return out


def _evaluate(
    cfg: TrainConfig, model: Any, fn: Any, examples: list[PairExample], tokenizer: Any, ref_logps: list[tuple]
) -> dict[str, float]:
    """Held-out loss, implicit-reward accuracy and margins (reference = the starting model)."""
    was_training = model.training
    model.eval()
    pol = _eval_logps(model, fn, examples, tokenizer, cfg.batch_size)
    model.train(was_training)
    pc = SeqLogps(torch.cat([p[0].sum for p in pol]), torch.cat([p[0].count for p in pol]))
    pr = SeqLogps(torch.cat([p[1].sum for p in pol]), torch.cat([p[1].count for p in pol]))
    rc = SeqLogps(torch.cat([p[0].sum for p in ref_logps]), torch.cat([p[0].count for p in ref_logps]))
    rr = SeqLogps(torch.cat([p[1].sum for p in ref_logps]), torch.cat([p[1].count for p in ref_logps]))
    pl = _fspo_losses(cfg, (pc, pr), (rc, rr))
    metrics = {
        "eval/reward_accuracy": pl.accuracy.item(),
        "eval/margin": pl.margins.mean().item(),
        "eval/chosen_reward": pl.chosen_rewards.mean().item(),
        "eval/rejected_reward": pl.rejected_rewards.mean().item(),
        "eval/chosen_nll_per_token": sft_loss(pc.sum, pc.count).item(),
        "eval/logp_accuracy": (pc.reduce(cfg.reduction) > pr.reduce(cfg.reduction)).float().mean().item(),
        "eval/episodes": float(len(examples)),
    }
    metrics["eval/loss"] = pl.loss.item() if cfg.stage == "fspo" else metrics["eval/chosen_nll_per_token"]
    return metrics


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Run one training stage as configured; returns where the final model folder is.

    `resume=True` continues from the latest complete checkpoint in ``cfg.out`` (or starts fresh if
    there is none); without it, an ``out`` that already holds checkpoints is refused.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    out = Path(cfg.out)
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise UserError(
            f"{out} already holds checkpoints ({ckpt.name}): pass --resume to continue, or another --out"
        )
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
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)

    model, tokenizer = _build_model(cfg)
    fn = pair_logps_fn(cfg.logps_impl)
    world = accelerator.num_processes
    # A run bounded by max_steps reads only the episodes it will consume (the sampler already
    # shuffled the file; 5% spare covers over-budget skips): rendering and tokenizing a
    # 100k-episode file for a 1k-episode run would take longer than the run itself.
    needed = None
    if cfg.max_steps:
        needed = math.ceil(cfg.max_steps * cfg.batch_size * cfg.grad_accum * world * 1.05) + 8
    examples, stats = _load_split(cfg, cfg.episodes, "train", tokenizer, needed)
    if not examples:
        raise UserError(
            f"no training episode fits max_tokens={cfg.max_tokens} (all {stats.episodes} are over budget)"
        )
    batches_per_epoch = len(examples) // (cfg.batch_size * world)
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise UserError(
            f"{len(examples)} usable episodes are fewer than one optimizer step needs "
            f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes)"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    eval_examples: list[PairExample] = []
    eval_ref: list[tuple] = []
    if cfg.eval_episodes:
        split = "test_unseen"
        eval_examples, _ = _load_split(cfg, cfg.eval_episodes, split, tokenizer, cfg.eval_max_episodes)
        if main and eval_examples:
            # Reference log-probs of the held-out set, once, from the starting model.
            model.eval()
            if cfg.lora is not None:
                with model.disable_adapter():
                    eval_ref = _eval_logps(model, fn, eval_examples, tokenizer, cfg.batch_size)
            else:
                eval_ref = _eval_logps(model, fn, eval_examples, tokenizer, cfg.batch_size)
            model.train()

    reference = _Reference(model, lora=cfg.lora is not None) if cfg.stage == "fspo" else None
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
    if cfg.report_to:
        accelerator.init_trackers("fspo", config={k: str(v) for k, v in cfg.model_dump().items()})

    log = AppendLog(out / "metrics.jsonl") if main else None
    if log is not None:
        log.append(
            {
                "event": "start",
                "step": start_step,
                "total_steps": total_steps,
                "processes": world,
                "train_examples": len(examples),
                "render": stats.summary(),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        )
    progress = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc=f"train {cfg.stage}", dynamic_ncols=True)

    orders: dict[int, list[list[int]]] = {}

    def micro_batch(m: int) -> list[PairExample]:
        epoch, b = divmod(m, batches_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batch_order(
                len(examples), cfg.batch_size, epoch, cfg.seed, accelerator.process_index, world
            )
        return [examples[i] for i in orders[epoch][b]]

    model.train()
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start_step, total_steps):
        sums: dict[str, torch.Tensor] = {}
        for k in range(cfg.grad_accum):
            batch = make_batch(micro_batch(step * cfg.grad_accum + k), tokenizer)
            window_tokens += batch.num_tokens
            sync = contextlib.nullcontext() if k == cfg.grad_accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                if cfg.stage == "fspo":
                    ref = reference.pair_logps(unwrapped, fn, batch)
                    policy = fn(model, batch)
                    pl = _fspo_losses(cfg, policy, ref)
                    loss = pl.loss
                    parts = {
                        "loss": pl.loss.detach(),
                        "reward_accuracy": pl.accuracy,
                        "margin": pl.margins.mean(),
                        "chosen_reward": pl.chosen_rewards.mean(),
                        "rejected_reward": pl.rejected_rewards.mean(),
                    }
                else:
                    lp = forward_logps(
                        model, collate_targets(batch.prompt_ids, batch.chosen_ids, batch.pad_id)
                    )
                    loss = sft_loss(lp.sum, lp.count)
                    parts = {"loss": loss.detach()}
                accelerator.backward(loss / cfg.grad_accum)
            for name, v in parts.items():
                sums[name] = sums.get(name, 0) + v.detach().float() / cfg.grad_accum
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if done % cfg.log_every == 0 or done == total_steps:
            reduced = {
                k: accelerator.reduce(v.to(accelerator.device), "mean").item() for k, v in sums.items()
            }
            elapsed = time.perf_counter() - window_start
            last = {
                **reduced,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": window_tokens * world / max(elapsed, 1e-9),
            }
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            window_tokens, window_start = 0, time.perf_counter()
            if log is not None:
                log.append({"step": done, **last})
            accelerator.log(last, step=done)
            if progress is not None:
                progress.set_postfix(
                    {k: f"{v:.3g}" for k, v in last.items() if k in ("loss", "reward_accuracy")}
                )
        if eval_examples and cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
            eval_metrics = _eval_and_log(
                cfg, accelerator, unwrapped, fn, eval_examples, tokenizer, eval_ref, log, done
            )
        if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
            save_checkpoint(accelerator, out, done, {"total_steps": total_steps}, cfg.keep_checkpoints)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    if eval_examples:
        eval_metrics = _eval_and_log(
            cfg, accelerator, unwrapped, fn, eval_examples, tokenizer, eval_ref, log, total_steps
        )

    model_dir = out / "model"
    if main:
        _save_final(
            cfg,
            unwrapped,
            tokenizer,
            out,
            model_dir,
            {"steps": total_steps, "metrics": last, "eval": eval_metrics, "render": stats.summary()},
        )
    accelerator.wait_for_everyone()
    if log is not None:
        log.append({"event": "end", "step": total_steps, **eval_metrics})
        log.close()
    accelerator.end_training()
    return TrainResult(out, model_dir, total_steps, last, eval_metrics, stats.summary())


def _eval_and_log(cfg, accelerator, unwrapped, fn, examples, tokenizer, ref, log, step) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        metrics = _evaluate(cfg, unwrapped, fn, examples, tokenizer, ref)
        if log is not None:
            log.append({"step": step, **metrics})
        accelerator.log(metrics, step=step)
    accelerator.wait_for_everyone()
    return metrics


def _save_final(
    cfg: TrainConfig, unwrapped: Any, tokenizer: Any, out: Path, model_dir: Path, summary: dict[str, Any]
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
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    cfg.save(tmp / CONFIG_FILE)
    atomic_write_json(tmp / "train_summary.json", summary)
    old = out / ".model.old"
    shutil.rmtree(old, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(old)
    tmp.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_json(out / "train_summary.json", summary)
