"""A training run's output folder: what it holds, which runs may write it, and the final model in it.

The policy itself is `fspo.core.outputs.OutputFolder`: a folder holding another run (other
settings) is refused unless overwritten; one holding this run is continued with ``--resume``. The
final model is saved to a staging folder and renamed into place, so ``model/`` is all or nothing.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError
from fspo.core.files import atomic_write_json, atomic_write_text
from fspo.core.outputs import OutputFolder
from fspo.train.card import CARD_FILE, SUMMARY_FILE, model_card
from fspo.train.checkpoint import latest_checkpoint
from fspo.train.config import CONFIG_FILE, TrainConfig

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


def run_folder(cfg: TrainConfig, overwrite: bool = False) -> OutputFolder:
    """``cfg.out`` as the folder of this run, identified by every setting that changes what it trains."""
    params = cfg.model_dump(mode="json", exclude=_NOT_THE_RUN)
    return OutputFolder(
        cfg.out, f"train {cfg.stage}", params, OUTPUTS,
        overwrite=overwrite, resumable=True, resume_option="--resume",
    )  # fmt: skip


def output_folder(cfg: TrainConfig, resume: bool, overwrite: bool) -> OutputFolder:
    """The run folder under the output policy (`fspo.core.outputs`): a folder holding another run is
    refused without `overwrite`; one holding this run (same settings) is continued with `resume`,
    and refused without it once there is something to lose (a checkpoint or a finished model)."""
    folder = run_folder(cfg, overwrite)
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


def save_model_folder(
    cfg: TrainConfig,
    unwrapped: Any,
    tokenizer: Any,
    out: Path,
    model_dir: Path,
    summary: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> None:
    """save_pretrained + tokenizer + fspo_config.json + summary + card into a temp folder, then rename:
    all or nothing. `state`: the full state dict where the model is sharded (FSDP), else None.

    A LoRA run also keeps its adapter (``adapter/``) but saves merged weights as the model, so every
    consumer loads it with `AutoModelForCausalLM` like any other model folder.
    """
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = unwrapped
        if cfg.lora is not None:
            unwrapped.save_pretrained(str(tmp / "adapter"))
            model = copy.deepcopy(unwrapped).merge_and_unload()
        model.save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        cfg.save(tmp / CONFIG_FILE)
        atomic_write_json(tmp / SUMMARY_FILE, summary)
        atomic_write_text(tmp / CARD_FILE, model_card(cfg, summary))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-saved model (a full disk) is never left behind
        raise
    old = out / ".model.old"
    shutil.rmtree(old, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(old)
    tmp.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_json(out / SUMMARY_FILE, summary)
