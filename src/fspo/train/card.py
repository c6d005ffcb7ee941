"""The model card (``README.md``) of a trained model folder, as Hugging Face users expect one.

Every training run writes it beside its weights (`fspo.train.trainer`): base model, data, prompt
template, training budget and the run's last metrics, read from the run's own config and summary so
the card cannot disagree with the folder. A recipe that measures the model afterwards
(``benchmarks/smollm2_fspo.py``) writes it again with its results (`write_model_card`). The metadata
block is `huggingface_hub.ModelCardData`'s YAML, which the Hub reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError
from fspo.core.files import atomic_write_text, read_fields
from fspo.infer.layout import CONFIG_FILE
from fspo.models.gguf_import import MARKER as IMPORT_RECORD
from fspo.train.config import TrainConfig
from fspo.train.objective import objective_for

CARD_FILE = "README.md"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
SUMMARY_FILE = "train_summary.json"


def _base_model(model: str) -> tuple[str | None, str]:
    """(hub id for the metadata or None, how the card names the starting model)."""
    folder = Path(model)
    if not folder.is_dir():  # a hub id ("org/name") goes into the metadata; a path that is gone does not
        return (model if HUB_ID.fullmatch(model) else None), f"`{model}`"
    record = folder / IMPORT_RECORD
    if record.is_file():
        source = json.loads(record.read_text()).get("source", "")
        imported = Path(source).name
        return None, f"`{folder.name}` (a local folder made by `fspo model import` from `{imported}`)"
    trained = folder / CONFIG_FILE
    if trained.is_file():  # a model fspo trained: name what it started from
        return None, f"`{folder}` (an fspo run that started from `{read_fields(trained).get('model')}`)"
    return None, f"`{folder}` (a local folder)"


def _cell(value: Any) -> str:
    """A Markdown table cell: a `|` or a line break inside (generated answers have both) would end it."""
    return str(value).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    cols = list(rows[0])
    return [
        "| " + " | ".join(_cell(c) for c in cols) + " |",
        "|" + "---|" * len(cols),
        *["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows],
    ]


Results = dict[str, list[dict[str, Any]]]  # section title -> table rows (column -> value)


def _metadata(cfg: TrainConfig, hub_id: str | None) -> str:
    """The YAML block the Hub reads (`huggingface_hub.ModelCardData`)."""
    from huggingface_hub import ModelCardData

    tags = ["fspo", "personalization", "preference-optimization", cfg.loss]
    if cfg.lora is not None:
        tags.append("lora")
    meta = ModelCardData(
        base_model=hub_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    return meta.to_yaml()


def _data_lines(cfg: TrainConfig, render: dict[str, Any]) -> list[str]:
    """What the model was trained on: the episodes, shots and prompt lengths the run's render stats give."""
    shots = render.get("mean_shots_used")
    lines = [
        f"- episodes: `{cfg.episodes}`; {render.get('kept', '?')} training episodes loaded "
        f"({render.get('over_budget_skipped', 0)} over the token budget skipped)",
        f"- shots per episode: {shots:.3g} on average" if isinstance(shots, float) else "",
        f"- prompt tokens: {render['mean_prompt_tokens']:.0f} on average, "
        f"{render.get('max_prompt_tokens')} at most"
        if render.get("mean_prompt_tokens")
        else "",
    ]
    return [line for line in lines if line]


def _template_lines(cfg: TrainConfig) -> list[str]:
    """The prompt layout the model expects, which `fspo generate` reads from the folder."""
    layout = cfg.template_options()
    yes = {True: "yes", False: "no"}
    return [
        f"- the model's chat template: {yes[layout.chat_template]}; dispreferred answers in the shots: "
        f"{yes[layout.include_dispreferred]}; RAT (user description before the answer): {cfg.rat}; "
        f"token budget {cfg.max_tokens}",
        f"- `fspo generate --model <this folder>` prompts it the same way (the layout is in `{CONFIG_FILE}`)",
    ]


def _training_lines(cfg: TrainConfig, summary: dict[str, Any]) -> list[str]:
    """The objective and the budget: steps, batch, schedule, LoRA, precision."""
    k = cfg.questions_per_context
    unit = f"contexts of up to {k} questions" if k > 1 else "episodes"
    lora = cfg.lora
    lines = [
        f"- stage: {objective_for(cfg).describe()}",
        f"- steps: {summary.get('steps')} of batch {cfg.batch_size} x grad_accum {cfg.grad_accum} x "
        f"{summary.get('processes', 1)} process(es) ({unit}), "
        f"lr {cfg.lr} ({cfg.scheduler}, {cfg.warmup_steps} warm-up), optimizer {cfg.optimizer}",
        f"- wall time of the last session (setup included; a resumed run's earlier sessions not): "
        f"{summary['seconds']:.0f} s"
        if "seconds" in summary
        else "",
        f"- LoRA: r {lora.r}, alpha {lora.alpha}, targets {lora.target_modules}; merged into these weights, "
        "the adapter alone in `adapter/`"
        if lora is not None
        else "- full fine-tuning",
        f"- chosen-answer NLL weight (RPO): {cfg.nll_weight}" if cfg.nll_weight else "",
        f"- mixed precision: {cfg.mixed_precision}; seed {cfg.seed}",
    ]
    return [line for line in lines if line]


def model_card(
    cfg: TrainConfig, summary: dict[str, Any], results: Results | None = None, notes: str = ""
) -> str:
    """The card's Markdown: metadata, then what the model is, how it was trained, and `results`
    (section title -> table rows, each a dict of column -> value) when a recipe measured it."""
    hub_id, base = _base_model(cfg.model)
    metrics = summary.get("metrics", {})
    lines = [
        "---",
        _metadata(cfg, hub_id),
        "---",
        "",
        f"# {Path(cfg.out).name}: a model personalized with FSPO",
        "",
        "Trained with [fspo](https://arxiv.org/abs/2502.19312) (Few-Shot Preference Optimization): given a "
        "few labeled preferences of one user in its prompt, it answers a new question as that user would "
        "prefer, with no per-user training.",
        "",
        *_section("Base model", [base]),
        *_section("Data", _data_lines(cfg, summary.get("render", {}))),
        *_section("Prompt template", _template_lines(cfg)),
        *_section("Training", _training_lines(cfg, summary)),
        "Last logged training metrics:",
        "",
        *_table([{k: f"{v:.4g}" for k, v in metrics.items()}] if metrics else []),
        "",
    ]
    if summary.get("eval"):
        lines += ["Held-out evaluation at the end of training:", "", *_table([summary["eval"]]), ""]
    for title, rows in (results or {}).items():
        lines += _section(title, _table(rows))
    if notes:
        lines += [notes.strip(), ""]
    reproduce = f"`fspo train {cfg.stage} --config {CONFIG_FILE}` (this folder's copy of the run's config)."
    lines += _section("How to reproduce", [reproduce])
    return "\n".join(lines)


def _section(title: str, body: list[str]) -> list[str]:
    return [f"## {title}", "", *body, ""]


def write_model_card(model_dir: str | Path, results: Results | None = None, notes: str = "") -> Path:
    """(Re)write ``README.md`` of a trained model folder from its config and summary, with `results`."""
    folder = Path(model_dir)
    for name in (CONFIG_FILE, SUMMARY_FILE):
        if not (folder / name).is_file():
            raise UserError(f"{folder} is not a model folder fspo trained (no {name})")
    cfg = TrainConfig.model_validate(read_fields(folder / CONFIG_FILE))
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    path = folder / CARD_FILE
    atomic_write_text(path, model_card(cfg, summary, results, notes))
    return path
