"""Pydantic configuration of a training run (both stages), saved as ``fspo_config.json``.

A run is reproducible from that file alone: `fspo train fspo --config run/fspo_config.json`. Field
names are the CLI option names (dashes ↔ underscores), and an invalid value is reported by field.

`TrainConfig`'s field defaults are the one source of defaults. Named configs are data that override
them: the recipes `fspo train sft|fspo` starts from (``recipes/<stage>.yaml``) and the quickstart's
profiles (``quickstart/<profile>.yaml``). They live in the package, ``src/fspo/configs/``, read with
`importlib.resources`: pyproject.toml's package data (``**/*.yaml``) ships them in a wheel, and an
editable install reads the same files in place, so one copy serves both. The repository's top-level
``configs/`` holds example inputs passed by path (``configs/synth/``, `fspo synth run`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fspo.core.errors import UserError
from fspo.core.files import atomic_write_json, read_fields
from fspo.data.template import TemplateOptions
from fspo.infer.layout import CONFIG_FILE

Stage = Literal["sft", "fspo"]
RatMode = Literal["none", "target", "teacher-forced", "description"]

NAMED_CONFIGS = resources.files("fspo") / "configs"

__all__ = ["CONFIG_FILE", "LoraConfig", "TrainConfig", "load_config", "make_config", "named_config", "recipe"]


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" (peft's shortcut) or explicit module names, e.g. ["q_proj", "v_proj"] / ["c_attn"].
    target_modules: list[str] | str = "all-linear"


class TrainConfig(BaseModel):
    """Everything a run needs. Its field defaults are the defaults; a recipe (`recipe`) overrides some."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    stage: Stage = "fspo"
    model: str = Field(..., description="model folder (or a hub id when a hub is reachable)")
    episodes: str = Field(..., description="episodes JSONL file, or an episodes folder (split 'train')")
    eval_episodes: str | None = None
    out: str = "runs/train"

    # Prompt template.
    shots: int | None = Field(
        None, ge=0, description="use at most this many shots per episode (0 = zero-shot)"
    )
    include_dispreferred: bool = True
    rat: RatMode = "none"
    max_tokens: int | None = Field(1024, ge=16)
    chat_template: bool = False

    # Loss.
    loss: Literal["dpo", "ipo"] = "ipo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    reduction: Literal["sum", "mean"] = "sum"
    nll_weight: float = Field(
        0.0,
        ge=0,
        description="fspo stage: add this times the chosen answer's NLL per token to the preference loss "
        "(RPO, Pang et al. 2024, arXiv 2404.19733). IPO/DPO only raise the chosen answer relative to the "
        "rejected one, so both may fall; without this anchor a small model can learn to end its answers "
        "at once.",
    )
    logps_impl: Literal["concat", "prefix"] = "concat"

    # SFT objective.
    shot_loss: bool = Field(
        False,
        description="SFT: also score every shot's preferred answer, each given the shots before it "
        "(every prefix of an episode is a few-shot example: ~(shots+1)x the in-context signal per "
        "sequence at no extra compute); needs questions_per_context 1",
    )

    # Speed (docs/speed.md). None of these changes what is learned, only how fast.
    questions_per_context: int = Field(
        1,
        ge=1,
        description="score up to K questions of one user that share the same shots in one row "
        "(needs logps_impl 'prefix' and episodes built with questions_per_context=K); "
        "batch_size then counts contexts",
    )
    group_by_length: bool | None = Field(
        None, description="length-bucketed batches; None = on exactly when logps_impl is 'prefix'"
    )
    reference_cache: bool = Field(
        True,
        description="compute reference log-probs once before training and keep them in a sidecar "
        "file beside the episodes; False = a reference forward in every step",
    )

    # Optimisation.
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(10, ge=0)
    batch_size: int = Field(8, ge=1, description="per process, per micro-batch")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(10.0, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    seed: int = 0

    # Infrastructure.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    eval_every: int = Field(0, ge=0, description="0 = only at the end (when eval_episodes is set)")
    eval_max_episodes: int = Field(256, ge=1)
    save_every: int = Field(0, ge=0, description="checkpoint every K optimizer steps; 0 = never")
    keep_checkpoints: int = Field(1, ge=1)
    log_every: int = Field(5, ge=1)
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    progress: bool = True

    @field_validator("questions_per_context")
    @classmethod
    def _k_needs_prefix(cls, k: int, info: ValidationInfo) -> int:
        if k > 1 and info.data.get("logps_impl") != "prefix":
            raise ValueError("questions_per_context > 1 needs logps_impl 'prefix' (the shared-row scorer)")
        if k > 1 and info.data.get("shot_loss"):
            raise ValueError("questions_per_context > 1 cannot be combined with shot_loss")
        return k

    @field_validator("shot_loss")
    @classmethod
    def _shot_loss_for_sft(cls, on: bool, info: ValidationInfo) -> bool:
        if on and info.data.get("stage") != "sft":
            raise ValueError("shot_loss is an SFT objective (stage 'sft')")
        return on

    @property
    def bucketed(self) -> bool:
        """Whether batches are length-bucketed (`group_by_length`, resolved)."""
        return self.logps_impl == "prefix" if self.group_by_length is None else self.group_by_length

    def template_options(self) -> TemplateOptions:
        return TemplateOptions.of_training(
            include_dispreferred=self.include_dispreferred,
            rat=self.rat,
            chat_template=self.chat_template,
            max_tokens=self.max_tokens,
        )

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.model_dump(mode="json"))


def _field_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        parts.append(f"field '{loc}': {e['msg']}")
    return "; ".join(parts)


def make_config(values: dict[str, Any], source: str = "options") -> TrainConfig:
    """Validate `values` into a `TrainConfig`; a bad field becomes one `UserError` naming it."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise UserError(f"invalid training config ({source}): {_field_errors(err)}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a config file (JSON, or YAML by extension) and apply non-None `overrides` on top."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    values = read_fields(p)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(values, source=str(path))


def named_config(kind: str, name: str) -> dict[str, Any]:
    """The fields of the config shipped as ``fspo/configs/<kind>/<name>.yaml`` (see the module doc)."""
    folder = NAMED_CONFIGS / kind
    file = folder / f"{name}.yaml"
    if not file.is_file():
        names = sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))
        raise UserError(f"unknown {kind} config {name!r}; choose one of {', '.join(names)}")
    return read_fields(file)


def recipe(stage: Stage) -> dict[str, Any]:
    """The fields `fspo train <stage>` starts from when no config file is given (``recipes/<stage>.yaml``)."""
    return named_config("recipes", stage)
