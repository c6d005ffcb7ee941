"""The training loop end to end on tiny models: any HF causal LM, both stages, config round trip, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_args, train_world, write_jsonl
from fspo.core.errors import UserError
from fspo.testing import toy_episodes, toy_users
from fspo.train.card import write_model_card
from fspo.train.config import CONFIG_FILE, load_config, make_config, recipe
from fspo.train.trainer import train

FSPO = [sys.executable, "-c", "from fspo.cli import main; main()"]
# Wide terminal: rich would wrap the one-line message at 80 columns.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "400"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    world = train_world(root, toy_episodes(toy_users(8), per_user=4, shots=2))
    test = toy_episodes(toy_users(4, prefix="t"), per_user=2, shots=2, seed=1)
    return {**world, "test": write_jsonl(root / "test.jsonl", test)}


def _cfg(world: dict[str, Path], stage: str, model: str, out: Path, **kw: object):
    values = {
        **recipe(stage),
        "model": str(world[model]) if model in world else model,
        "episodes": str(world["train"]),
        "eval_episodes": str(world["test"]),
        "out": str(out),
        "batch_size": 4,
        "max_steps": 3,
        "log_every": 1,
        "progress": False,
        **kw,
    }
    return make_config(values)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_any_causal_lm_trains_both_stages(world: dict[str, Path], tmp_path: Path, arch: str) -> None:
    sft = train(_cfg(world, "sft", arch, tmp_path / "sft"))
    assert (sft.model_dir / "model.safetensors").is_file() and (sft.model_dir / CONFIG_FILE).is_file()
    assert sft.steps == 3 and sft.metrics["loss"] > 0
    fspo = train(_cfg(world, "fspo", str(sft.model_dir), tmp_path / "fspo", eval_every=2))
    assert {"eval/reward_accuracy", "eval/margin", "eval/loss"} <= fspo.eval_metrics.keys()
    rows = [json.loads(x) for x in (tmp_path / "fspo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_accuracy" in r] == [1, 2, 3]
    assert sum("eval/reward_accuracy" in r for r in rows) >= 2  # every 2 steps and at the end
    # The saved model is a plain HF folder.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(fspo.model_dir) is not None


def test_fspo_first_step_is_at_reference(world: dict[str, Path], tmp_path: Path) -> None:
    """Before any update the policy is the reference: h=0, so IPO loss = (1/(2β))² exactly."""
    r = train(_cfg(world, "fspo", "llama", tmp_path / "r", max_steps=1, beta=0.5, lr=1e-12, warmup_steps=0))
    assert r.metrics["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2, rel=1e-4)
    assert r.metrics["margin"] == pytest.approx(0.0, abs=1e-4)


def test_nll_weight_adds_the_chosen_nll(world: dict[str, Path], tmp_path: Path) -> None:
    """RPO: loss = IPO + α · NLL per token of the chosen answer; at the reference IPO is (1/(2β))²."""
    kw = {"max_steps": 1, "beta": 0.5, "lr": 1e-12, "warmup_steps": 0}
    plain = train(_cfg(world, "fspo", "llama", tmp_path / "plain", **kw))
    r = train(_cfg(world, "fspo", "llama", tmp_path / "rpo", nll_weight=0.5, **kw))
    nll = r.metrics["chosen_nll"]
    assert nll == pytest.approx(plain.metrics["chosen_nll"]) and nll > 0
    assert r.metrics["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2 + 0.5 * nll, rel=1e-4)
    assert plain.metrics["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2, rel=1e-4)


def test_lora_rat_and_shot_budget(world: dict[str, Path], tmp_path: Path) -> None:
    r = train(
        _cfg(
            world,
            "fspo",
            "llama",
            tmp_path / "l",
            lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
            rat="target",
            max_tokens=150,
            loss="dpo",
        )
    )
    assert (r.model_dir / "adapter" / "adapter_config.json").is_file()
    assert r.render_stats["shots_dropped"] > 0 and r.render_stats["kept"] > 0
    # The model card beside the weights: metadata the Hub reads, then the run's own facts.
    card = (r.model_dir / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- lora" in card
    assert (
        "loss `dpo`" in card
        and "LoRA: r 4" in card
        and "RAT (user description before the answer): target" in card
    )
    assert f"{r.render_stats['kept']} training episodes loaded" in card and "token budget 150" in card
    write_model_card(
        r.model_dir, {"Win rates": [{"system": "fspo", "vs": "base", "win rate": "61.0%"}]}, "Measured."
    )
    again = (r.model_dir / "README.md").read_text()
    assert "## Win rates" in again and "| fspo | base | 61.0% |" in again and "Measured." in again
    with pytest.raises(UserError, match="not a model folder fspo trained"):
        write_model_card(tmp_path)


def test_config_file_reproduces_run(world: dict[str, Path], tmp_path: Path) -> None:
    a = train(_cfg(world, "sft", "llama", tmp_path / "a"))
    cfg = load_config(tmp_path / "a" / CONFIG_FILE, {"out": str(tmp_path / "b")})
    b = train(cfg)
    assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], rel=1e-6)


def test_invalid_config_names_field(world: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="field 'beta'"):
        make_config({"model": "m", "episodes": "e", "beta": -1})
    with pytest.raises(UserError, match="field 'optimizer'"):
        make_config({"model": "m", "episodes": "e", "optimizer": "sgd"})


def test_preferences_file_and_missing_descriptions(world: dict[str, Path], tmp_path: Path) -> None:
    prefs = [e.query for e in toy_episodes(toy_users(2), per_user=1)]
    with pytest.raises(UserError, match="holds preferences, not episodes"):
        train(
            _cfg(
                world, "sft", "llama", tmp_path / "p", episodes=str(write_jsonl(tmp_path / "p.jsonl", prefs))
            )
        )
    no_desc = [e.model_copy(update={"description": None}) for e in toy_episodes(toy_users(2), per_user=4)]
    path = write_jsonl(tmp_path / "nd.jsonl", no_desc)
    with pytest.raises(UserError, match="no user description"):
        train(_cfg(world, "sft", "llama", tmp_path / "nd", episodes=str(path), rat="target"))


def _cli(*words: str, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FSPO, *cli_args(*words, **options)], capture_output=True, text=True, env=ENV, timeout=120
    )


def test_cli_user_errors_are_one_line(world: dict[str, Path], tmp_path: Path) -> None:
    missing = _cli("train", "sft", model=tmp_path / "nope", episodes=world["train"], out=tmp_path / "o")
    assert missing.returncode == 2, missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "neither a local model folder" in lines[0] and "Traceback" not in missing.stderr
    )
    bad = _cli("train", "fspo", model=world["llama"], episodes=world["train"], beta=0, out=tmp_path / "o")
    assert bad.returncode == 2 and "field 'beta'" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_trains_with_rat_flag(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    options = {"max_steps": 2, "batch_size": 4, "rat": "target", "progress": False}
    r = _cli("train", "sft", model=world["llama"], episodes=world["train"], out=out, **options)
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["rat"] == "target" and saved["stage"] == "sft" and saved["max_steps"] == 2
    r = _cli(
        "train", "sft", config=out / CONFIG_FILE, out=tmp_path / "cli2", rat="teacher-forced", progress=False
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "cli2" / CONFIG_FILE).read_text())["rat"] == "teacher-forced"
