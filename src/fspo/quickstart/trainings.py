"""The quickstart's training runs as `TrainConfig`s: the registry's trainings with the profile's overrides.

Each run's config is the one layering every `fspo train` run gets (`TrainConfig`'s defaults, the stage's
recipe, then explicit values), the explicit values being, lowest first: the profile's seed and shot
layout, its `train` table, its table for the stage (`sft` / `fspo`), the training's own overrides in
`fspo.eval.systems.TRAININGS`, the population adjustment, and the profile's `trainings.<name>` table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fspo.eval import systems as registry
from fspo.eval.systems import RAT_PAIRS_TRAINING, Training
from fspo.train.config import TrainConfig, train_config

# Paths of a run, not settings: left out of a stage's cache key (the stage folders are fixed).
PATH_FIELDS = ("model", "out", "episodes", "eval_episodes")
# The stage holding the train split built with the profile's `questions_per_context` queries per shot
# set (run only when that is above 1), which the few-shot FSPO-stage trainings read.
CONTEXTS = "contexts"


def trainings_of(p: Any) -> tuple[Training, ...]:
    """The trainings profile `p` runs, in order: RAT's description pairs only when it samples them."""
    return tuple(t for t in registry.TRAININGS if t.name != RAT_PAIRS_TRAINING or p.rat_pairs_samples)


def training_configs(p: Any, model_dir: str, episodes: Path, out: Path) -> dict[str, TrainConfig]:
    """Every training of `p` as its effective config: started from `model_dir` (the pretrained model)
    or the model of its `start` training under `out`, on the episodes folder `episodes`."""
    configs: dict[str, TrainConfig] = {}
    for t in trainings_of(p):
        values = _values(p, t)
        start = model_dir if t.start is None else str(out / t.start / "model")
        pairs = t.name == RAT_PAIRS_TRAINING  # trains on the description pairs the `rat_pairs` stage wrote
        train_file = out / "rat_pairs" / "train.jsonl" if pairs else episodes / "train.jsonl"
        if shares_contexts(p, t):
            train_file = out / CONTEXTS / "train.jsonl"
        values |= {
            "model": start,
            "episodes": str(train_file),
            "eval_episodes": str(episodes / "test_unseen.jsonl"),
            "out": str(out / t.name),
        }
        configs[t.name] = _config(t, values)
    return configs


def shares_contexts(p: Any, t: Training) -> bool:
    """Whether training `t` scores `p.questions_per_context` questions per row: the few-shot
    FSPO-stage runs on the episodes (SFT keeps one per row for its shot loss; the population sees no
    shots to share; RAT's description pairs are a file of their own)."""
    few_shot_fspo = t.stage == "fspo" and not t.population and t.name != RAT_PAIRS_TRAINING
    return p.questions_per_context > 1 and few_shot_fspo


def _values(p: Any, t: Training) -> dict[str, Any]:
    values: dict[str, Any] = {
        "seed": p.seed,
        "include_dispreferred": p.include_dispreferred,
        "progress": True,
        **p.train,
        **getattr(p, t.stage),
        **t.overrides,
    }
    if t.population:
        # The population runs get their few-shot counterparts' budget: as many steps, and an SFT
        # batch that holds as many answers (few-shot SFT with shot_loss trains on every shot's answer
        # too, so its batch of episodes is (shots + 1) times the answers). So the two differ in what
        # they condition on, not in how much they learned from.
        # Likewise a population IPO batch holds as many pairs as FSPO's, whose rows hold
        # `questions_per_context` questions each.
        if t.stage == "sft" and values.get("shot_loss"):
            answers = p.shots + 1
        else:
            answers = p.questions_per_context if t.stage == "fspo" else 1
        batch = values.get("batch_size", TrainConfig.model_fields["batch_size"].default)
        values |= {"shots": 0, "shot_loss": False, "batch_size": batch * answers}
    elif shares_contexts(p, t):
        values["questions_per_context"] = p.questions_per_context
    values |= p.trainings.get(t.name, {})
    if "save_every" not in values and values.get("max_steps"):
        # Checkpoints only make a killed run resumable: four per run loses at most a quarter of it.
        values["save_every"] = max(1, values["max_steps"] // 4)
    return values


def _config(t: Training, values: dict[str, Any]) -> TrainConfig:
    return train_config(t.stage, values, source=f"profile tables train, {t.stage}, trainings.{t.name}")


def cache_key(cfg: TrainConfig) -> dict[str, Any]:
    """What a training stage's result depends on: its whole effective config but the paths."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in PATH_FIELDS}
