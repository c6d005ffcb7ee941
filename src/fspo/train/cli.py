"""The `fspo train` sub-commands: `sft` and `fspo` (one training loop), and `rat-pairs`.

Their flags are derived from the pydantic models that hold the settings (`TrainConfig`, `LoraConfig`,
`PairSampling`): one flag per field, named after it (``--field-name``, ``--x/--no-x`` for booleans,
``--lora-r`` for LoRA's fields, comma-separated values for lists), its help the field's description,
its choices the field's `Literal`. A training flag defaults to None, "not given", so that only what
the command line names lands on top of the stage's recipe and a `--config` file
(`fspo.train.config.resolve_config`, the same layering as Python's `TrainConfig(...)`).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fspo.core.errors import UserError
from fspo.train.config import ResolvedConfig, TrainConfig, resolve_config
from fspo.train.rat_pairs import PairSampling

app = typer.Typer(
    help="Train: few-shot preference fine-tuning (sft) and FSPO (IPO/DPO).", no_args_is_help=True
)

_KW = inspect.Parameter.KEYWORD_ONLY


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """A field's type without `None`, and whether it is a list (given comma-separated)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        lists = [a for a in args if typing.get_origin(a) is list]
        return (lists[0] if lists else args[0]), bool(lists)
    return annotation, typing.get_origin(annotation) is list


def _flag(name: str, field: FieldInfo, prefix: str, show_default: bool) -> inspect.Parameter:
    kind, is_list = _unwrap(field.annotation)
    flag = f"--{prefix}{name}".replace("_", "-")
    help_text, metavar = field.description or "", None
    if show_default and not field.is_required():
        help_text += f" (default: {field.get_default(call_default_factory=True)})"
    if is_list:
        item = typing.get_args(kind)[0]
        if typing.get_origin(item) is Literal:
            help_text += f" (comma-separated: {', '.join(typing.get_args(item))})"
        annotation: Any = str
    elif kind is bool:
        flag, annotation = f"{flag}/--no-{flag[2:]}", bool
    elif typing.get_origin(kind) is Literal:  # a str checked by the model, whose error names the field
        metavar, annotation = "|".join(typing.get_args(kind)), str
    else:
        annotation = kind
    option = typer.Option(None, flag, help=help_text, show_default=False, metavar=metavar)
    return inspect.Parameter(f"{prefix}{name}", _KW, default=option, annotation=annotation | None)


def model_flags(
    model: type[BaseModel], prefix: str = "", show_defaults: bool = False, skip: tuple[str, ...] = ()
) -> list[inspect.Parameter]:
    """One typer option per field of `model` but `skip`; a nested model field (LoRA) is ``--x/--no-x``
    plus one ``--x-<field>`` per field of its model."""
    params = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kind, _ = _unwrap(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            switch = f"--{prefix}{name}".replace("_", "-")
            option = typer.Option(
                None, f"{switch}/--no-{switch[2:]}", help=field.description, show_default=False
            )
            params.append(inspect.Parameter(f"{prefix}{name}", _KW, default=option, annotation=bool | None))
            params += model_flags(kind, f"{prefix}{name}_", show_defaults)
        else:
            params.append(_flag(name, field, prefix, show_defaults))
    return params


def given_values(model: type[BaseModel], flags: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The fields whose flags were given (not None), as `model`'s input; lists split at commas."""
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        kind, is_list = _unwrap(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            nested = given_values(kind, flags, f"{key}_")
            switch = flags.get(key)
            if switch is False and nested:
                given = ", ".join(f"--{key}-{k}".replace("_", "-") for k in nested)
                raise UserError(f"--no-{key} contradicts {given}")
            if switch is not None or nested:
                values[name] = nested if switch is not False else None
        elif flags.get(key) is not None:
            value = flags[key]
            keep = not is_list or value == field.default  # a str shortcut of a list field: 'all-linear'
            values[name] = value if keep else [x.strip() for x in value.split(",") if x.strip()]
    return values


def _command(name: str, fn: Callable[..., None], derived: list[inspect.Parameter], doc: str) -> None:
    """Register `fn` as `name`: its own typer options, then the `derived` ones, which reach its
    ``**kwargs`` (typer reads the signature; this module's postponed annotations resolved for it)."""
    hints = typing.get_type_hints(fn)
    own = [
        p.replace(annotation=hints[p.name], kind=_KW)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    params = own + derived

    def command(**options: Any) -> None:
        fn(**options)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    app.command(name)(command)


def show_config(resolved: ResolvedConfig, title: str) -> None:
    """The effective config as a table: field, value, source (default / recipe / file / flag)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("source", no_wrap=True)
    for name, value, source in resolved.rows():
        table.add_row(name, str(value), source, style="dim" if source == "default" else None)
    Console().print(table)


def _train_command(stage: Literal["sft", "fspo"]) -> Callable[..., None]:
    def command(
        config: str | None = typer.Option(
            None, help="Config file (JSON/YAML), e.g. a run's fspo_config.json: over the recipe, under flags."
        ),
        resume: bool = typer.Option(
            False, help="Continue from the latest checkpoint in --out (if none: says so, starts at step 0)."
        ),
        overwrite: bool = typer.Option(
            False, help="Replace the run in --out (another run's, or a finished one of these settings)."
        ),
        print_config: bool = typer.Option(
            False, "--print-config", help="Print every effective value and where it came from; do not train."
        ),
        **flags: Any,
    ) -> None:
        resolved = resolve_config(
            given_values(TrainConfig, flags), stage=stage, config_file=config, source="flag"
        )
        if print_config:
            show_config(resolved, f"fspo train {stage}")
            return
        from rich.console import Console

        from fspo.train.trainer import train

        result = train(resolved.config, resume=resume, overwrite=overwrite)
        console = Console()
        console.print(f"model saved to [bold]{result.model_dir}[/] after {result.steps} steps")
        shown = {**result.metrics, **result.eval_metrics}
        if shown:
            console.print(", ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    return command


_TRAIN_DOC = (
    "Values: TrainConfig's defaults < the stage's recipe (fspo/configs/recipes/{stage}.yaml) < --config "
    "< flags; --print-config shows each value and its source."
)
for _stage, _doc in (
    (
        "sft",
        "Few-shot preference fine-tuning: NLL of the chosen answer given the episode (--shots 0: plain SFT).",
    ),
    (
        "fspo",
        "FSPO: IPO (default) or DPO against the frozen starting model (--shots 0: the population baseline).",
    ),
):
    _command(
        _stage,
        _train_command(_stage),
        model_flags(TrainConfig, skip=("stage",)),
        f"{_doc}\n\n{_TRAIN_DOC.format(stage=_stage)}",
    )


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
        help="How a sample is scored against the true description: traits:<domain> (simulated users' "
        "trait values) or embedding[:<sentence-transformers folder>] (free text; default all-MiniLM-L6-v2).",
    ),
    max_episodes: int | None = typer.Option(None, help="Use the first N episodes of the file."),
    **sampling: Any,
) -> None:
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
        options=trained_layout(model),
        progress=True,
        **given_values(PairSampling, sampling),
    )
    Console().print(
        f"{stats['pairs']} description pairs from {stats['episodes']} episodes "
        f"(mean sample score {stats['mean_score']:.3f}, {stats['ties_left_out']} ties left out) -> {out}"
    )


_command(
    "rat-pairs",
    rat_pairs,
    model_flags(PairSampling, show_defaults=True),
    "RAT's description pairs (v2): sample descriptions, pair the closest to the truth with the farthest.\n\n"
    "Train on the result with `fspo train fspo --rat description --episodes OUT/train.jsonl --model MODEL`.",
)


def onpolicy(
    config: str | None = typer.Option(
        None, help="On-policy config file (JSON/YAML), e.g. a run's onpolicy_config.json: under flags."
    ),
    overwrite: bool = typer.Option(False, help="Replace the on-policy run in --out (one of other settings)."),
    **flags: Any,
) -> None:
    from rich.console import Console

    from fspo.train.onpolicy import OnPolicyConfig, onpolicy_config, run_onpolicy

    values = given_values(OnPolicyConfig, flags)
    train = given_values(TrainConfig, flags, "train_")
    if train:
        values["train"] = train
    cfg = onpolicy_config(values, config_file=config, source="flag")
    summary = run_onpolicy(cfg, progress=True, overwrite=overwrite)
    console = Console()
    for rec in summary["rounds"]:
        reward = "n/a" if rec["mean_reward"] is None else f"{rec['mean_reward']:.4g}"
        console.print(
            f"round {rec['round']}: {rec['pairs']} pairs, {rec['ties']} ties, mean reward {reward}, "
            f"{rec['mean_words']:.1f} words, {rec['degenerate_share']:.0%} loops"
        )
    console.print(f"model saved to [bold]{summary['model']}[/]; per round: {cfg.out}/summary.json")


def _onpolicy_flags() -> list[inspect.Parameter]:
    """OnPolicyConfig's flags, ``--decoding-*`` for its `Decoding`, and ``--train-*`` for the rounds'
    `TrainConfig` overrides (less the fields each round sets)."""
    from fspo.infer.generate import Decoding
    from fspo.train.onpolicy import SET_BY_ROUND, OnPolicyConfig

    return (
        model_flags(OnPolicyConfig, show_defaults=True, skip=("decoding", "train"))
        + model_flags(Decoding, prefix="decoding_")
        + model_flags(TrainConfig, prefix="train_", skip=SET_BY_ROUND)
    )


_command(
    "onpolicy",
    onpolicy,
    _onpolicy_flags(),
    "On-policy FSPO: rounds of sampling the model's own answers for training users' episodes, pairing "
    "the best and worst by the labeller of the training data, and training IPO on them.\n\n"
    "Sampling defaults to temperature 1 (--decoding-* lie over that). Each round's IPO run: the fspo "
    "recipe < the model's layout < --config's `train` < --train-* flags. Rerunning resumes; a finished "
    "round is skipped; more --rounds extend a finished run. See docs/train.md, On-policy FSPO.",
)
