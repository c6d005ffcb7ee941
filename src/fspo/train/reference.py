"""The reference of FSPO's loss (the starting model; with LoRA the same model with its adapters off).

Its log-probs come one of two ways, both answering `score(units, policy)` with the policy's and the
reference's log-probs of one batch:

* `CachedReference` (``reference_cache``, the default): computed once before training by
  `reference_values`, stored beside the episodes file (`fspo.train.refcache`) and looked up per step.
* `StepReference`: scored in every step, by a frozen copy of the starting model, or by the LoRA
  model itself with its adapters disabled.

`reference_values` also gives held-out evaluation its reference, for either stage.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fspo.train.config import TrainConfig
from fspo.train.contexts import Unit
from fspo.train.refcache import ReferenceCache, Values, model_fingerprint, reference_logps, sidecar_path
from fspo.train.scoring import PairLogps, looked_up, score_pairs

Policy = Callable[[], PairLogps]  # the policy's forward pass of the same batch


class CachedReference:
    """Reference log-probs computed before training (`reference_values`), looked up per batch."""

    def __init__(self, values: Values):
        self.values = values

    def score(self, units: list[Unit], policy: Policy) -> tuple[PairLogps, PairLogps]:
        scored = policy()
        return scored, looked_up(self.values, units, scored)


class StepReference:
    """Reference log-probs scored in every step (``reference_cache=False``).

    Without LoRA a frozen copy of `model` taken now, before any update. With LoRA, `model` itself with
    its adapters disabled: accelerate wraps the model it prepares but does not replace it, so this is
    the very module being trained.
    """

    def __init__(self, cfg: TrainConfig, model: Any, pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id
        self.lora = cfg.lora is not None
        self.model = model if self.lora else copy.deepcopy(model).eval().requires_grad_(False)

    def score(self, units: list[Unit], policy: Policy) -> tuple[PairLogps, PairLogps]:
        ref = self._pair_logps(units)
        return policy(), ref

    @torch.no_grad()
    def _pair_logps(self, units: list[Unit]) -> PairLogps:
        if not self.lora:
            return score_pairs(self.cfg, self.model, units, self.pad_id)
        was_training = self.model.training
        self.model.eval()
        with self.model.disable_adapter():
            out = score_pairs(self.cfg, self.model, units, self.pad_id)
        self.model.train(was_training)
        return out


def reference_fingerprint(cfg: TrainConfig) -> str | None:
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


def reference_values(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    units: list[Unit],
    file: Path,
    pad_id: int,
    model_fp: str | None,
) -> tuple[Values, dict[str, Any]]:
    """Reference log-probs of `units` from the starting model, computed once, cached under `model_fp`;
    and what the run's log says about them (cache file, computed, reused, seconds).

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
