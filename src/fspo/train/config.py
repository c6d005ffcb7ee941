"""Pydantic configuration of a training run (both stages), saved as ``fspo_config.json``.

One layering, whichever way a run is asked for (CLI flags, a config file, Python), lowest first:

1. `TrainConfig`'s field defaults (each with its help text, which the CLI flags show);
2. the stage's recipe, ``recipes/<stage>.yaml``: the values that depend on the stage (lr, scheduler,
   FSPO's beta), which a run must not take from the other stage's regime;
3. a config file (`fspo train ... --config FILE`), e.g. a previous run's ``fspo_config.json``;
4. explicit values: CLI flags, or the keyword arguments / dict a Python caller gives.

`TrainConfig(stage="fspo", model=..., episodes=...)` applies 1-2 and 4 by itself (a before-validator
fills what the input does not give from its stage's recipe), so Python and `fspo train fspo --model
... --episodes ...` give the same run. `resolve_config` adds the file layer and records where each
value came from (`fspo train ... --print-config`). A saved ``fspo_config.json`` names every field, so
it reloads as the same run whatever the recipes say later. An invalid value is reported by field.

Named configs (recipes, the quickstart's ``quickstart/<profile>.yaml``) live in the package,
``src/fspo/configs/``, read with `importlib.resources`: pyproject.toml's package data (``**/*.yaml``)
ships them in a wheel, and an editable install reads the same files in place. The repository's
top-level ``configs/`` holds example inputs passed by path (``configs/synth/``, `fspo synth run`).
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fspo.core.errors import UserError
from fspo.core.files import atomic_write_json, read_fields
from fspo.data.template import TemplateOptions
from fspo.infer.layout import CONFIG_FILE

Stage = Literal["sft", "fspo"]
RatMode = Literal["none", "target", "teacher-forced", "description"]

NAMED_CONFIGS = resources.files("fspo") / "configs"
DEFAULT = "default"  # the source of a value no layer gave: the field's default

__all__ = [
    "CONFIG_FILE",
    "LoraConfig",
    "ResolvedConfig",
    "TrainConfig",
    "load_config",
    "make_config",
    "named_config",
    "recipe",
    "resolve_config",
    "train_config",
]

_RAT_HELP = (
    "RAT: 'target' trains the model to write '## User Description' then the answer; 'teacher-forced' "
    "puts the true description in the prompt; 'description' trains on the descriptions alone (the "
    "pairs of `fspo train rat-pairs`); 'none' turns it off"
)


class LoraConfig(BaseModel):
    """LoRA adapters (peft). `alpha` not given is 2 × `r`, so the update's scale alpha/r stays 2."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(
        32, ge=1, description="LoRA scale numerator (the update is scaled by alpha/r); default 2 × r"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="modules that get adapters: all-linear (peft's shortcut) or names, e.g. q_proj,v_proj",
    )

    @model_validator(mode="before")
    @classmethod
    def _alpha_follows_r(cls, data: Any) -> Any:
        if isinstance(data, dict) and "alpha" not in data and isinstance(data.get("r"), int):
            return {**data, "alpha": 2 * data["r"]}
        return data


class TrainConfig(BaseModel):
    """Everything a run needs. Values the input does not give come from the stage's recipe, then
    from these field defaults (see the module doc)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    stage: Stage = Field(
        "fspo",
        description="sft: NLL of the chosen answer given the episode; fspo: IPO/DPO against the frozen "
        "starting model. Picks the recipe (recipes/<stage>.yaml) under the given values",
    )
    model: str = Field(..., description="model folder (e.g. from `fspo model init`), or a hub id")
    episodes: str = Field(..., description="training episodes: a JSONL file or an episodes folder (train)")
    eval_episodes: str | None = Field(
        None, description="held-out episodes: a file or folder (test_unseen); none = no evaluation"
    )
    out: str = Field("runs/train", description="run folder: checkpoints, metrics.jsonl, model/")

    # Prompt template.
    shots: int | None = Field(
        None, ge=0, description="use at most this many shots per episode (0 = zero-shot); none = all"
    )
    include_dispreferred: bool = Field(True, description="shots show the dispreferred answer too")
    rat: RatMode = Field("none", description=_RAT_HELP)
    max_tokens: int | None = Field(
        1024, ge=16, description="token budget per episode; whole shots are dropped to fit"
    )
    chat_template: bool = Field(False, description="wrap each episode in the tokenizer's chat template")

    # Loss.
    loss: Literal["dpo", "ipo"] = Field("ipo", description="fspo stage: the preference loss")
    beta: float = Field(
        0.1, gt=0, description="fspo stage: β of IPO/DPO (IPO's target margin is 1/(2β) nats of log-ratio)"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO: assumed probability that a preference label is flipped"
    )
    reduction: Literal["sum", "mean"] = Field("sum", description="log-prob reduction over an answer's tokens")
    nll_weight: float = Field(
        0.0,
        ge=0,
        description="fspo stage: add this times the chosen answer's NLL per token to the preference loss "
        "(RPO, Pang et al. 2024, arXiv 2404.19733). IPO/DPO only raise the chosen answer relative to the "
        "rejected one, so both may fall; without this anchor a small model can learn to end its answers "
        "at once",
    )
    logps_impl: Literal["concat", "prefix"] = Field(
        "concat", description="pair scorer: concat, or prefix (the prompt runs once per pair)"
    )

    # SFT objective.
    shot_loss: bool = Field(
        False,
        description="sft stage: also score every shot's preferred answer, each given the shots before it "
        "(every prefix of an episode is a few-shot example: ~(shots+1)x the in-context signal per "
        "sequence at no extra compute); needs questions_per_context 1",
    )

    # Speed (docs/speed.md). None of these changes what is learned, only how fast.
    questions_per_context: int = Field(
        1,
        ge=1,
        description="score up to K questions of one user that share the same shots in one row "
        "(needs logps_impl prefix and episodes built with questions_per_context=K); "
        "batch_size then counts contexts",
    )
    group_by_length: bool | None = Field(
        None, description="length-bucketed batches (less padding); default: on exactly with logps_impl prefix"
    )
    reference_cache: bool = Field(
        True,
        description="compute reference log-probs once before training and keep them in a sidecar "
        "file beside the episodes; off = a reference forward in every step",
    )

    # Optimisation.
    optimizer: Literal["adamw", "rmsprop"] = Field("adamw", description="the optimizer")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.0, ge=0, description="the optimizer's weight decay")
    scheduler: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="learning-rate shape after the linear warmup"
    )
    warmup_steps: int = Field(10, ge=0, description="optimizer steps of linear warmup")
    batch_size: int = Field(8, ge=1, description="episodes (or contexts) per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(10.0, gt=0, description="gradient clipping norm; none = no clipping")
    epochs: float = Field(1.0, gt=0, description="passes over the training episodes (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    seed: int = Field(0, description="seed of the batch order, dropout and new weights")

    # Infrastructure.
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast precision")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters (peft) instead of all weights; none = full fine-tuning"
    )
    eval_every: int = Field(
        0, ge=0, description="evaluate every K optimizer steps; 0 = only at the end (with eval_episodes)"
    )
    eval_max_episodes: int = Field(256, ge=1, description="evaluate on at most this many held-out episodes")
    save_every: int = Field(0, ge=0, description="checkpoint every K optimizer steps; 0 = never")
    keep_checkpoints: int = Field(1, ge=1, description="checkpoints kept in the run folder (newest)")
    log_every: int = Field(5, ge=1, description="log training metrics every K optimizer steps")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="trackers besides metrics.jsonl"
    )
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="before")
    @classmethod
    def _recipe_under_given(cls, data: Any) -> Any:
        """Fields the input does not give take its stage's recipe (layer 2 of the module doc)."""
        if isinstance(data, dict):
            stage = data.get("stage", cls.model_fields["stage"].default)
            if stage in get_args(Stage):
                return {**recipe(stage), **data}
        return data

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


class ResolvedConfig(NamedTuple):
    """A validated config and, per value, the layer it came from: "default", "recipe <stage>", a
    config file's path, or the explicit values' `source`. Keys are the field names and, while LoRA
    is on, ``lora.<field>`` for each of its settings."""

    config: TrainConfig
    sources: dict[str, str]

    def rows(self) -> list[tuple[str, Any, str]]:
        """(name, effective value, source) for every key of `sources`, in field order."""
        return [(key, value, self.sources[key]) for key, value in _flat(self.config).items()]


def _flat(config: TrainConfig) -> dict[str, Any]:
    """Every field's value; a nested model (LoRA) is "on" and each of its fields one more key."""
    out: dict[str, Any] = {}
    for name, value in config.model_dump(mode="json").items():
        out[name] = "on" if isinstance(value, dict) else value
        out |= {f"{name}.{k}": v for k, v in (value.items() if isinstance(value, dict) else ())}
    return out


def resolve_config(
    overrides: dict[str, Any] | None = None,
    *,
    stage: Stage | None = None,
    config_file: str | Path | None = None,
    source: str = "flag",
) -> ResolvedConfig:
    """The run asked for: field defaults < the stage's recipe < `config_file` < `overrides` (whose
    values, `None` included, are all explicit; `source` names them in `sources` and in errors). The
    stage is `stage`, else the overrides', else the file's, else TrainConfig's default."""
    explicit = {**(overrides or {}), **({"stage": stage} if stage else {})}
    layers = [(str(config_file), _read_config_file(config_file))] if config_file is not None else []
    layers.append((source, explicit))
    chosen = next(
        (v["stage"] for _, v in reversed(layers) if "stage" in v), TrainConfig.model_fields["stage"].default
    )
    if chosen in get_args(Stage):
        layers.insert(0, (f"recipe {chosen}", recipe(chosen)))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, layer in layers:
        _merge(values, sources, layer, name)
    config = make_config(values, source=" < ".join(name for name, _ in layers), sources=sources)
    return ResolvedConfig(config, {key: sources.get(key, DEFAULT) for key in _flat(config)})


def train_config(stage: Stage, overrides: dict[str, Any], source: str = "python") -> TrainConfig:
    """`resolve_config` without a file: the stage's recipe under `overrides` (errors name `source`)."""
    return resolve_config(overrides, stage=stage, source=source).config


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A config file (JSON, or YAML by extension) over its stage's recipe, `overrides` on top."""
    return resolve_config(overrides, config_file=path, source="overrides").config


def make_config(
    values: dict[str, Any], source: str = "options", sources: dict[str, str] | None = None
) -> TrainConfig:
    """Validate `values` into a `TrainConfig` (the stage's recipe under them); a bad field becomes one
    `UserError` naming it and, from `sources`, where its value came from."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise UserError(f"invalid training config ({source}): {_field_errors(err, sources or {})}") from None


def _field_errors(err: ValidationError, sources: dict[str, str]) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        where = sources.get(loc) or sources.get(str(e["loc"][0]) if e["loc"] else "")
        parts.append(f"field '{loc}'{f' (from {where})' if where else ''}: {e['msg']}")
    return "; ".join(parts)


def _merge(
    values: dict[str, Any], sources: dict[str, str], layer: dict[str, Any], name: str, prefix: str = ""
) -> None:
    """Lay `layer` over `values`: nested dicts (LoRA's) merge key by key, anything else replaces."""
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            _merge(values[key], sources, value, name, f"{path}.")
        else:
            for stale in [k for k in sources if k.startswith(f"{path}.")]:
                del sources[stale]
            values[key] = copy.deepcopy(value)
            if isinstance(value, dict):
                sources.update({f"{path}.{k}": name for k in value})
        sources[path] = name


def _read_config_file(path: str | Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    return read_fields(Path(path))


def named_config(kind: str, name: str) -> dict[str, Any]:
    """The fields of the config shipped as ``fspo/configs/<kind>/<name>.yaml`` (see the module doc)."""
    folder = NAMED_CONFIGS / kind
    file = folder / f"{name}.yaml"
    if not file.is_file():
        names = sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))
        raise UserError(f"unknown {kind} config {name!r}; choose one of {', '.join(names)}")
    return read_fields(file)


def recipe(stage: Stage) -> dict[str, Any]:
    """The fields ``recipes/<stage>.yaml`` sets: layer 2, under a config file and explicit values."""
    return copy.deepcopy(_recipe(stage))


@functools.cache
def _recipe(stage: Stage) -> dict[str, Any]:
    return named_config("recipes", stage)
