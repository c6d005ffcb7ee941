"""The paper-scale GPU recipe (configs/llama-3.2-3b/*.yaml through configs/accelerate/*.yaml), as far as a
CPU can check it: the files say what docs/gpu.md says, and both stages run end to end, launched by
`accelerate launch` with the FSDP file, on a tiny Llama (`LlamaForCausalLM`, Llama-3.2's class) with
every training setting of the recipe (bf16 autocast, RMSprop, gradient checkpointing, summed IPO
at beta 0.01, prefix rows, cached reference).

On a CPU accelerate runs the FSDP file as plain multi-process data parallelism (it enables FSDP only
on GPUs), so FSDP's sharding itself is not exercised here; the trainer's FSDP-specific paths are the
full-state-dict gather before the save and the evaluation on every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_llama_dir, write_jsonl
from fspo.data.episodes import build_episodes
from fspo.testing import toy_corpus, toy_preferences, toy_users
from fspo.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
RECIPE = ROOT / "configs" / "llama-3.2-3b"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_accelerate_files_are_what_the_docs_say() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ACCELERATE / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.mixed_precision == "bf16" and not fsdp.use_cpu
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the save gathers whole weights
    ddp = load_config_from_file(str(ACCELERATE / "ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.mixed_precision == "bf16"


def test_recipe_has_the_papers_hyperparameters() -> None:
    where = {"model": "m", "episodes": "e"}
    sft = load_config(RECIPE / "sft.yaml", where)
    fspo = load_config(RECIPE / "fspo.yaml", where)
    for cfg in (sft, fspo):
        assert (cfg.shots, cfg.optimizer, cfg.warmup_steps, cfg.max_grad_norm) == (8, "rmsprop", 150, 10.0)
        assert (cfg.mixed_precision, cfg.max_tokens, cfg.chat_template) == ("bf16", 8192, True)
        assert cfg.lora is None  # full fine-tuning, as the paper
    assert (sft.stage, sft.lr) == ("sft", 1e-7)
    assert (fspo.stage, fspo.loss, fspo.beta, fspo.reduction, fspo.lr) == ("fspo", "ipo", 0.01, "sum", 1e-6)


@pytest.mark.slow
def test_both_stages_run_under_accelerate_launch_with_the_fsdp_file(tmp_path: Path) -> None:
    users = toy_users(6)
    prefs = toy_preferences(users, per_user=10)
    eps = build_episodes(prefs, users, shots=2, train_passes=2, test_user_fraction=0.2, heldout_per_user=0)
    episodes = tmp_path / "episodes"
    episodes.mkdir()
    write_jsonl(episodes / "train.jsonl", eps["train"])
    write_jsonl(episodes / "test_unseen.jsonl", eps["test_unseen"])
    model = tiny_llama_dir(tmp_path / "llama", toy_corpus(eps["train"]) * 2)
    # The GPU file with the two lines a CPU needs: no GPU, two processes.
    cpu = {**yaml.safe_load((ACCELERATE / "fsdp.yaml").read_text()), "use_cpu": True, "num_processes": 2}
    launch_cfg = tmp_path / "fsdp-cpu.yaml"
    launch_cfg.write_text(yaml.safe_dump(cpu))
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(launch_cfg),
                "-m", "fspo"]  # fmt: skip
    start = str(model)
    for stage in ("sft", "fspo"):
        out = tmp_path / stage
        args = ["train", stage, "--config", str(RECIPE / f"{stage}.yaml"), "--model", start, "--episodes",
                str(episodes), "--eval-episodes", str(episodes), "--out", str(out), "--max-steps", "3",
                "--warmup-steps", "1", "--eval-every", "2", "--no-progress"]  # fmt: skip
        done = subprocess.run([*launcher, *args], env=ENV, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["processes"] == 2 and rows[0]["distributed"] == "MULTI_CPU"
        assert sum("eval/loss" in r for r in rows if "event" not in r) == 2  # at step 2 and at the end
        assert rows[-1]["event"] == "end" and all(r["loss"] == r["loss"] for r in rows if "loss" in r)
        saved = json.loads((out / "model" / "fspo_config.json").read_text())
        assert saved["mixed_precision"] == "bf16" and saved["gradient_checkpointing"] is True
        assert (out / "model" / "README.md").is_file() and (out / "model" / "model.safetensors").is_file()
        start = str(out / "model")
    assert rows[0]["reference"]["train"]["computed"] > 0  # the fspo stage scored its reference once


def test_lora_under_fsdp_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # FSDP cannot run on a CPU: the accelerator is told it is under FSDP, as on GPUs with fsdp.yaml.
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from fspo.core.errors import UserError
    from fspo.train.config import LoraConfig, TrainConfig
    from fspo.train.trainer import setup

    users = toy_users(4)
    eps = build_episodes(toy_preferences(users, per_user=6), users, shots=1, test_user_fraction=0)
    episodes = write_jsonl(tmp_path / "train.jsonl", eps["train"])
    model = tiny_llama_dir(tmp_path / "llama", toy_corpus(eps["train"]))
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    cfg = TrainConfig(model=str(model), episodes=str(episodes), out=str(tmp_path / "r"), lora=LoraConfig(r=2))
    with pytest.raises(UserError, match="LoRA under FSDP is not supported.*ddp.yaml"):
        setup(cfg)
