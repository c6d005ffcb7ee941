"""fspo's IPO loss with ``reduction: mean`` equals TRL's `DPOTrainer` IPO loss on the same batch, and the
training run's public step (`setup` / `train_step` / `batch_loss`, what ``benchmarks/vs_trl.py`` times)
is the step `train` runs. TRL is a dev/benchmark dependency; the comparison uses the same peft model,
so the weights cannot differ, and TRL's own collator on fspo's token ids, so the tokens cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_dir, write_jsonl
from fspo.data.episodes import build_episodes
from fspo.testing import toy_corpus, toy_preferences, toy_users
from fspo.train.config import LoraConfig, TrainConfig
from fspo.train.trainer import batch_loss, setup, step_batches, train, train_step

trl = pytest.importorskip("trl", reason="TRL is a dev dependency (pip install -e '.[dev]')")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """TRL's Trainer sets accelerate's process-wide state its own way; the next `setup` needs it fresh."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _world(tmp_path: Path) -> tuple[Path, Path]:
    users = toy_users(5)
    prefs = toy_preferences(users, per_user=8)
    eps = build_episodes(prefs, users, shots=2, train_passes=2, test_user_fraction=0, heldout_per_user=0,
                         questions_per_context=2)["train"]  # fmt: skip
    episodes = write_jsonl(tmp_path / "train.jsonl", eps)
    return tiny_llama_dir(tmp_path / "llama", toy_corpus(eps) * 3), episodes


def _config(model: Path, episodes: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(stage="fspo", model=str(model), episodes=str(episodes), out=str(out), loss="ipo", beta=0.5,
                reduction="mean", lora=LoraConfig(r=4, alpha=8), batch_size=2, max_steps=3, warmup_steps=0,
                lr=1e-3, progress=False, log_every=1, seed=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("layout", ["concat", "prefix-k2"])
def test_ipo_mean_loss_equals_trl(tmp_path: Path, layout: str) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model_dir, episodes = _world(tmp_path)
    speed = {"logps_impl": "prefix", "questions_per_context": 2} if layout == "prefix-k2" else {}
    run = setup(_config(model_dir, episodes, tmp_path / "run", **speed))
    model = run.unwrapped
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"),
            loss_type=["ipo"],
            beta=0.5,
            max_length=None,
            report_to=[],
            use_cpu=True,
            per_device_train_batch_size=4,
        ),  # fmt: skip
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=run.tokenizer,
    )
    if "ref" in model.peft_config:  # TRL's copy of a fresh adapter: its reference is then the adapter off
        model.delete_adapter("ref")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy away from the reference: at peft's init every IPO loss is 1/(4 beta^2)
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.eval()
    units = [run.units[i] for idx in step_batches(run, 0) for i in idx]
    rows = [{"prompt_ids": list(p.prompt), "chosen_ids": list(p.chosen), "rejected_ids": list(p.rejected)}
            for u in units for p in u.pairs()]  # fmt: skip
    with torch.no_grad():
        ours = float(batch_loss(run, units)[0])
        theirs = float(trainer.compute_loss(trainer.model, trainer.data_collator(rows)))
    assert ours != pytest.approx(1.0, abs=1e-3)  # the policy really moved away from the reference
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_public_steps_are_the_training_run(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model_dir, episodes = _world(tmp_path)
    whole = train(_config(model_dir, episodes, tmp_path / "whole"))
    run = setup(_config(model_dir, episodes, tmp_path / "steps"))
    run.model.train()
    losses = [float(train_step(run, step)[0]["loss"]) for step in range(run.total_steps)]
    logged = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r["loss"] for r in logged if "loss" in r and "event" not in r], abs=1e-6)
    trained = load_file(whole.model_dir / "adapter" / "adapter_model.safetensors")
    stepped = {k: v for k, v in run.unwrapped.state_dict().items() if "lora_" in k}
    assert {k.replace(".default", "") for k in stepped} == set(trained)
    for name, value in stepped.items():
        assert torch.allclose(value, trained[name.replace(".default", "")], atol=1e-6)
