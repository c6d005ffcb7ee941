"""One layering of a training config, whichever way it is asked for: TrainConfig's field defaults <
the stage's recipe < a config file < explicit values (flags, Python); flags derived from the fields."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from typer.testing import CliRunner

import fspo.train.cli as cli
from conftest import run_typer
from fspo.core.errors import UserError
from fspo.train.config import (
    LoraConfig,
    TrainConfig,
    load_config,
    recipe,
    resolve_config,
    train_config,
)
from fspo.train.rat_pairs import PairSampling, build_rat_pairs

REQUIRED = {"model": "m", "episodes": "e"}
REQUIRED_ARGS = ("--model", "m", "--episodes", "e")
WIDE = {"COLUMNS": "250"}  # rich wraps tables at 80 columns otherwise


@pytest.fixture
def cli_config(monkeypatch):
    """`fspo train STAGE ARGS... --print-config` -> the `ResolvedConfig` the command resolved."""
    seen = []
    monkeypatch.setattr(cli, "show_config", lambda resolved, title: seen.append(resolved))

    def run(stage: str, *args: str):
        result = CliRunner().invoke(cli.app, [stage, *args, "--print-config"])
        assert result.exit_code == 0 and seen, result.output
        return seen.pop()

    return run


def _options(stage: str) -> dict[str, Any]:
    """--flag -> click option of `fspo train STAGE`."""
    command = typer.main.get_command(cli.app).commands[stage]  # type: ignore[attr-defined]
    return {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def test_fspo_is_the_same_run_from_the_cli_an_empty_config_file_and_python(cli_config, tmp_path: Path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    args = REQUIRED_ARGS
    plain = cli_config("fspo", *args).config
    assert cli_config("fspo", *args, "--config", str(empty)).config == plain
    assert TrainConfig(stage="fspo", **REQUIRED) == plain
    assert TrainConfig(**REQUIRED) == plain  # fspo is the default stage, with its recipe
    assert train_config("fspo", REQUIRED) == plain
    assert load_config(empty, REQUIRED) == plain
    # What the recipe says is what every path gets, not TrainConfig's field defaults.
    fields = TrainConfig.model_fields
    for name, value in recipe("fspo").items():
        assert getattr(plain, name) == value
        assert name == "stage" or fields[name].default != value
    sft = cli_config("sft", *args).config
    assert sft == TrainConfig(stage="sft", **REQUIRED) and sft.lr == recipe("sft")["lr"]


def _flag_value(name: str, field: Any, effective: Any) -> tuple[str | None, Any]:
    """A valid value for field `name` other than `effective`: (as typed on the command line, as Python)."""
    optional = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    kind = optional[0] if type(None) in typing.get_args(field.annotation) else field.annotation
    if name == "target_modules":
        return "q_proj,v_proj", ["q_proj", "v_proj"]
    if typing.get_origin(kind) is list:
        choices = typing.get_args(typing.get_args(kind)[0])
        return ",".join(choices), list(choices)
    if typing.get_origin(kind) is Literal:
        value = next(c for c in typing.get_args(kind) if c != effective)
        return value, value
    if kind is bool:
        return None, not effective if effective is not None else True
    if kind is int:
        value = (effective or 1) + 1
        return str(value), value
    if kind is float:
        return "0.25", 0.25
    return "x", "x"


def test_every_field_has_a_flag_with_its_help_and_the_flag_sets_it(cli_config):
    options = _options("sft")
    base = TrainConfig(stage="sft", **REQUIRED)
    args: list[str] = []
    python: dict[str, Any] = {"lora": {}}
    fields = [(n, f, "", python) for n, f in TrainConfig.model_fields.items() if n not in ("stage", "lora")]
    fields += [(n, f, "lora-", python["lora"]) for n, f in LoraConfig.model_fields.items()]
    for name, field, prefix, into in fields:
        flag = f"--{prefix}{name.replace('_', '-')}"
        assert flag in options, f"{name} has no flag"
        assert field.description and field.description in options[flag].help
        if name == "shot_loss":  # checked below: it cannot be combined with questions_per_context > 1
            continue
        effective = getattr(LoraConfig() if prefix else base, name)
        typed, value = _flag_value(name, field, effective)
        if typed is None:  # a boolean: --x or --no-x
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, typed]
        into[name] = value
    assert "--lora" in options and "--no-lora" in options
    resolved = cli_config("sft", *args)
    assert resolved.config == TrainConfig(stage="sft", **python)
    given = [n for n, _, p, _ in fields if not p and n != "shot_loss"]
    assert {resolved.sources[n] for n in given} == {"flag"}
    assert resolved.sources["lora.r"] == "flag"
    assert cli_config("sft", *REQUIRED_ARGS, "--shot-loss").config.shot_loss is True


def test_existing_flag_spellings_still_work(cli_config):
    cfg = cli_config(
        "fspo", *REQUIRED_ARGS, "--lora", "--lora-r", "8", "--lora-target-modules", "all-linear",
        "--report-to", "tensorboard", "--no-progress", "--no-include-dispreferred", "--rat", "target",
    ).config  # fmt: skip
    assert cfg.lora == LoraConfig(r=8, alpha=16, target_modules="all-linear")  # alpha follows r: 2 x r
    assert (cfg.report_to, cfg.progress, cfg.include_dispreferred, cfg.rat) == (
        ["tensorboard"], False, False, "target"
    )  # fmt: skip
    assert cli_config("fspo", *REQUIRED_ARGS, "--lora").config.lora == LoraConfig()
    assert cli_config("fspo", *REQUIRED_ARGS, "--lora-alpha", "4").config.lora == LoraConfig(r=16, alpha=4)


def test_layers_and_their_sources(tmp_path: Path):
    file = tmp_path / "run.yaml"
    file.write_text("beta: 0.3\nmax_steps: 7\nlora: {r: 4, target_modules: [q_proj]}\n")
    resolved = resolve_config({**REQUIRED, "max_steps": 9, "lora": {"r": 2}}, stage="fspo", config_file=file)
    cfg, src = resolved
    assert (cfg.beta, cfg.max_steps, cfg.lr, cfg.warmup_steps) == (0.3, 9, 3e-4, 10)
    assert cfg.lora == LoraConfig(r=2, alpha=4, target_modules=["q_proj"])  # LoRA's fields merge one by one
    assert (src["beta"], src["max_steps"], src["lr"], src["warmup_steps"]) == (
        str(file),
        "flag",
        "recipe fspo",
        "default",
    )
    assert (src["lora.r"], src["lora.target_modules"]) == ("flag", str(file))
    rows = {name: (value, source) for name, value, source in resolved.rows()}
    assert set(rows) == set(TrainConfig.model_fields) | {f"lora.{k}" for k in LoraConfig.model_fields}
    assert rows["lora.alpha"] == (4, "default") and rows["lr"] == (3e-4, "recipe fspo")
    # A file's stage picks the recipe when no stage is asked for; the command's stage wins over it.
    staged = tmp_path / "sft.yaml"
    staged.write_text("stage: sft\n")
    assert load_config(staged, REQUIRED).lr == recipe("sft")["lr"]
    assert resolve_config(REQUIRED, stage="fspo", config_file=staged).config.lr == recipe("fspo")["lr"]


def test_a_saved_config_reloads_as_the_same_run(tmp_path: Path):
    cfg = train_config("sft", {**REQUIRED, "max_steps": 5, "lora": {"r": 4}})
    cfg.save(tmp_path / "fspo_config.json")
    resolved = resolve_config(config_file=tmp_path / "fspo_config.json")
    assert resolved.config == cfg
    assert set(json.loads((tmp_path / "fspo_config.json").read_text())) == set(TrainConfig.model_fields)
    assert all(s == str(tmp_path / "fspo_config.json") for s in resolved.sources.values())


def test_a_bad_value_names_its_field_and_where_it_came_from(tmp_path: Path):
    code, out = run_typer(cli.app, "fspo", *REQUIRED_ARGS, "--beta", "-1", "--print-config")
    assert code == 2 and "field 'beta' (from flag)" in out
    code, out = run_typer(cli.app, "fspo", *REQUIRED_ARGS, "--loss", "sgd")
    assert code == 2 and "field 'loss' (from flag): Input should be 'dpo' or 'ipo'" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0\nbatch_sise: 4\n")
    code, out = run_typer(cli.app, "sft", *REQUIRED_ARGS, "--config", str(bad))
    assert code == 2 and f"field 'lr' (from {bad})" in out and f"field 'batch_sise' (from {bad})" in out
    code, out = run_typer(cli.app, "sft", "--episodes", "e", "--print-config")
    assert code == 2 and "field 'model'" in out
    code, out = run_typer(cli.app, "sft", *REQUIRED_ARGS, "--no-lora", "--lora-r", "4")
    assert code == 2 and "--no-lora contradicts --lora-r" in out
    with pytest.raises(UserError, match=r"field 'questions_per_context' \(from python\)"):
        train_config("fspo", {**REQUIRED, "questions_per_context": 2})


def test_print_config_shows_every_value_and_its_source_and_does_not_train(tmp_path: Path):
    file = tmp_path / "f.yaml"
    file.write_text("max_steps: 7\n")
    out = tmp_path / "run"
    args = [
        "fspo",
        *REQUIRED_ARGS,
        "--out",
        str(out),
        "--config",
        str(file),
        "--lr",
        "0.01",
        "--print-config",
    ]
    result = CliRunner().invoke(cli.app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2])
    assert set(TrainConfig.model_fields) <= set(rows)
    assert rows["lr"] == ("0.01", "flag") and rows["beta"] == ("0.5", "recipe fspo")
    assert rows["max_steps"] == ("7", str(file)) and rows["warmup_steps"] == ("10", "default")
    assert not out.exists()  # nothing trained, no run folder


def test_rat_pairs_has_one_default_per_option(monkeypatch, tmp_path: Path):
    import fspo.data.episodes
    import fspo.infer.layout
    import fspo.models.loading
    import fspo.train.rat_pairs as rp

    calls = []
    for module in (fspo.models.loading, fspo.data.episodes, fspo.infer.layout):
        for name in ("load_model", "load_tokenizer", "load_episodes", "trained_layout"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda *a, **k: None)

    def fake(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {"pairs": 0, "episodes": 0, "mean_score": 0.0, "ties_left_out": 0}

    monkeypatch.setattr(rp, "build_rat_pairs", fake)
    io = [
        "rat-pairs",
        "--model",
        "m",
        "--episodes",
        "e",
        "--out",
        str(tmp_path),
        "--similarity",
        "traits:roleplay",
    ]
    assert run_typer(cli.app, *io)[0] == 0
    assert run_typer(cli.app, *io, "--batch-size", "2", "--no-include-true", "--top-p", "0.9")[0] == 0
    sampling = set(PairSampling.model_fields)
    default, given = ({k: v for k, v in c.items() if k in sampling} for c in calls)
    assert default == {}  # no flag given: build_rat_pairs' defaults, PairSampling's, apply
    assert given == {"batch_size": 2, "include_true": False, "top_p": 0.9}
    assert {f"--{n.replace('_', '-')}" for n in sampling} <= set(_options("rat-pairs"))
    with pytest.raises(UserError, match="samples"):
        build_rat_pairs(None, None, [], tmp_path, scorer=lambda a, b: [], samples=1)
