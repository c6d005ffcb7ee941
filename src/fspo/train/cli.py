"""The `fspo train` sub-commands: `sft` and `fspo`, one set of options, one training loop.

Options default to None so that only what is given on the command line overrides the run's starting
point: the stage's recipe (``fspo/configs/recipes/<stage>.yaml`` over `TrainConfig`'s defaults), or,
when given, a `--config` file (e.g. a previous run's ``fspo_config.json``), which replaces the recipe
(a saved config holds a whole run; fields a file lacks take `TrainConfig`'s defaults).
"""

from __future__ import annotations

from typing import Any

import typer

app = typer.Typer(
    help="Train: few-shot preference fine-tuning (sft) and FSPO (IPO/DPO).", no_args_is_help=True
)

_RAT_HELP = (
    "RAT: `--rat target` trains the model to write '## User Description' then the answer; "
    "`--rat teacher-forced` puts the true description in the prompt; `--rat description` trains on the "
    "descriptions alone (the pairs of `fspo train rat-pairs`); `--rat none` (default) turns it off."
)


def _run(stage: str, options: dict[str, Any], config: str | None, resume: bool, overwrite: bool) -> None:
    from rich.console import Console

    from fspo.train.config import load_config, make_config, recipe
    from fspo.train.trainer import train

    lora_r = options.pop("lora_r")
    lora_targets = options.pop("lora_target_modules")
    use_lora = options.pop("lora")
    if use_lora or lora_r is not None or lora_targets is not None:
        lora: dict[str, Any] = {}
        if lora_r is not None:
            lora.update(r=lora_r, alpha=2 * lora_r)
        if lora_targets is not None:
            lora["target_modules"] = lora_targets if lora_targets == "all-linear" else lora_targets.split(",")
        options["lora"] = lora
    if options.get("report_to") is not None:
        options["report_to"] = [x for x in options["report_to"].split(",") if x]
    if options.pop("no_progress"):
        options["progress"] = False
    given = {k: v for k, v in options.items() if v is not None}
    if config:
        cfg = load_config(config, {**given, "stage": stage})
    else:
        cfg = make_config({**recipe(stage), **given, "stage": stage})
    result = train(cfg, resume=resume, overwrite=overwrite)
    console = Console()
    console.print(f"model saved to [bold]{result.model_dir}[/] after {result.steps} steps")
    shown = {**result.metrics, **result.eval_metrics}
    if shown:
        console.print(", ".join(f"{k}={v:.4g}" for k, v in shown.items()))


def _options(
    model: str | None = typer.Option(None, help="Model folder (e.g. from `fspo model init`)."),
    episodes: str | None = typer.Option(None, help="Training episodes: a JSONL file or an episodes folder."),
    eval_episodes: str | None = typer.Option(None, help="Held-out episodes (file, or folder: test_unseen)."),
    out: str | None = typer.Option(None, help="Run folder: checkpoints, metrics.jsonl, model/."),
    config: str | None = typer.Option(None, help="Config file (JSON/YAML), e.g. a run's fspo_config.json."),
    resume: bool = typer.Option(
        False, help="Continue from the latest checkpoint in --out (if none: says so, starts at step 0)."
    ),
    overwrite: bool = typer.Option(
        False, help="Replace the run in --out (another run's, or a finished one of these settings)."
    ),
    shots: int | None = typer.Option(None, help="Use at most N shots per episode (0 = zero-shot baseline)."),
    include_dispreferred: bool | None = typer.Option(
        None, "--include-dispreferred/--no-include-dispreferred"
    ),
    rat: str | None = typer.Option(None, help=_RAT_HELP),
    max_tokens: int | None = typer.Option(None, help="Token budget per episode; whole shots are dropped."),
    loss: str | None = typer.Option(None, help="fspo stage: ipo | dpo."),
    beta: float | None = typer.Option(None, help="fspo stage: β of IPO/DPO."),
    reduction: str | None = typer.Option(None, help="Log-prob reduction over the answer: sum | mean."),
    nll_weight: float | None = typer.Option(
        None, help="fspo stage: weight of the chosen answer's NLL added to the preference loss (RPO)."
    ),
    shot_loss: bool | None = typer.Option(
        None,
        "--shot-loss/--no-shot-loss",
        help="sft stage: also train on every shot's preferred answer given the shots before it "
        "(more in-context signal per episode).",
    ),
    logps_impl: str | None = typer.Option(
        None, help="Pair scorer: concat | prefix (the prompt runs once per pair)."
    ),
    questions_per_context: int | None = typer.Option(
        None,
        help="Score up to K questions of one user sharing the same shots in one row (needs --logps-impl "
        "prefix and episodes built with questions_per_context=K); --batch-size then counts contexts.",
    ),
    group_by_length: bool | None = typer.Option(
        None,
        "--group-by-length/--no-group-by-length",
        help="Length-bucketed batches (less padding). Default: on with --logps-impl prefix.",
    ),
    reference_cache: bool | None = typer.Option(
        None,
        "--reference-cache/--no-reference-cache",
        help="Reference log-probs computed once and cached beside the episodes (default), "
        "or a reference forward in every step.",
    ),
    optimizer: str | None = typer.Option(None, help="adamw | rmsprop."),
    lr: float | None = typer.Option(None),
    scheduler: str | None = typer.Option(None, help="constant | cosine | linear (all with linear warmup)."),
    warmup_steps: int | None = typer.Option(None),
    batch_size: int | None = typer.Option(None, help="Episodes per micro-batch per process."),
    grad_accum: int | None = typer.Option(None),
    max_grad_norm: float | None = typer.Option(None),
    epochs: float | None = typer.Option(None),
    max_steps: int | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    mixed_precision: str | None = typer.Option(None, help="no | bf16 | fp16."),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing"
    ),
    lora: bool = typer.Option(False, help="Train LoRA adapters (peft) instead of all weights."),
    lora_r: int | None = typer.Option(None),
    lora_target_modules: str | None = typer.Option(None, help="Comma-separated module names, or all-linear."),
    eval_every: int | None = typer.Option(None),
    save_every: int | None = typer.Option(None, help="Checkpoint every K optimizer steps."),
    log_every: int | None = typer.Option(None, help="Log training metrics every K optimizer steps."),
    report_to: str | None = typer.Option(None, help="tensorboard and/or wandb, comma-separated."),
    no_progress: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """(shared option block; not a command)"""


def _command(stage: str, doc: str):
    def command(**kwargs: Any) -> None:
        config = kwargs.pop("config")
        resume = kwargs.pop("resume")
        overwrite = kwargs.pop("overwrite")
        _run(stage, kwargs, config, resume, overwrite)

    import inspect
    import typing

    # Both commands share `_options`' parameters; annotations resolved so typer sees real types.
    hints = typing.get_type_hints(_options)
    sig = inspect.signature(_options)
    params = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values()]
    command.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {k: v for k, v in hints.items() if k != "return"}
    command.__doc__ = doc
    command.__name__ = stage
    return command


app.command("sft")(
    _command(
        "sft",
        "Few-shot preference fine-tuning: NLL of the chosen answer given the episode (--shots 0: plain SFT).",
    )
)
app.command("fspo")(
    _command(
        "fspo",
        "FSPO: IPO (default) or DPO against the frozen starting model (--shots 0: the population baseline).",
    )
)


@app.command("rat-pairs")
def rat_pairs(
    model: str = typer.Option(
        ..., help="The RAT model to sample descriptions from (trained with --rat target)."
    ),
    episodes: str = typer.Option(
        ..., help="Training episodes with true descriptions: a JSONL file or a folder."
    ),
    out: str = typer.Option(
        ..., help="Output folder: train.jsonl (the pairs, as RAT episodes) and rat_pairs.json."
    ),
    similarity: str = typer.Option(
        ...,
        help="How a sample is scored against the true description: traits:<domain> (simulated users' trait "
        "values) or embedding[:<sentence-transformers folder>] (free text; default all-MiniLM-L6-v2).",
    ),
    samples: int = typer.Option(4, help="Descriptions sampled per episode."),
    max_episodes: int | None = typer.Option(None, help="Use the first N episodes of the file."),
    include_true: bool = typer.Option(
        True, help="Count the true description among the candidates (--no-include-true: samples only)."
    ),
    temperature: float = typer.Option(1.0, help="Sampling temperature (> 0)."),
    max_new_tokens: int = typer.Option(48, help="Token budget of one description."),
    batch_size: int = typer.Option(4, help="Episodes per generation batch (each gives `samples` rows)."),
    seed: int = typer.Option(0),
) -> None:
    """RAT's description pairs (v2): sample descriptions, pair the closest to the truth with the farthest.

    Train on the result with `fspo train fspo --rat description --episodes OUT/train.jsonl --model MODEL`.
    """
    from rich.console import Console

    from fspo.data.episodes import load_episodes
    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer
    from fspo.train.rat_pairs import build_rat_pairs, description_scorer

    scorer = description_scorer(similarity)
    stats = build_rat_pairs(
        load_model(model),
        load_tokenizer(model),
        load_episodes(episodes, "train", limit=max_episodes),
        out,
        scorer=scorer,
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        options=trained_layout(model),
        include_true=include_true,
        progress=True,
    )
    Console().print(
        f"{stats['pairs']} description pairs from {stats['episodes']} episodes "
        f"(mean sample score {stats['mean_score']:.3f}, {stats['ties_left_out']} ties left out) -> {out}"
    )
