"""SFT's `shot_loss`: every shot's preferred answer is a target too, found token for token.

The spans are checked against an independent labelling (character search in the rendered text
and the tokenizer's offsets, through the model's own `labels=` loss), for a bos-adding Llama
tokenizer, GPT-2 without bos, dropped shots and the chat template.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import train_world
from fspo.core.errors import UserError
from fspo.data.template import PREFERRED, TemplateOptions, render
from fspo.infer.logps import collate_targets, forward_logps
from fspo.testing import toy_episodes, toy_users
from fspo.train.config import make_config, recipe
from fspo.train.tokenize import tokenize_episodes
from fspo.train.trainer import train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_world(tmp_path_factory.mktemp("shotloss"), toy_episodes(toy_users(6), per_user=4, shots=3))


def _independent_loss(model, tokenizer, episode, options: TemplateOptions) -> float:
    """Mean NLL over the shots' preferred answers and the query's target, labelled by text search."""
    r = render(episode, options, tokenizer)
    kept = episode.shots[r.shots_dropped :]
    spans, at = [], 0
    for shot in kept:
        piece = PREFERRED + shot.chosen.strip() + "\n"
        at = r.prompt.index(piece, at) + len(piece)
        spans.append((at - len(piece) + len(PREFERRED), at))
    prompt = tokenizer(r.prompt, add_special_tokens=False, return_offsets_mapping=True)
    target = tokenizer(r.chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    bos = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    ids = ([tokenizer.bos_token_id] if bos else []) + prompt["input_ids"] + target
    labels = [-100] * len(ids)
    for k, (start, _) in enumerate(prompt["offset_mapping"], start=int(bos)):
        if any(a <= start < b for a, b in spans):
            labels[k] = ids[k]
    labels[-len(target) :] = target
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    return out.loss.item()


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", TemplateOptions()),
        ("gpt2", TemplateOptions()),
        ("llama", TemplateOptions(max_tokens=90)),  # shots dropped: spans of the kept ones only
        ("llama", TemplateOptions(chat_template=True)),
    ],
)
def test_shot_spans_match_an_independent_labelling(
    world: dict[str, Path], arch: str, options: TemplateOptions
) -> None:
    from fspo.models.loading import load_model, load_tokenizer

    model, tok = load_model(world[arch]), load_tokenizer(world[arch])
    episodes = toy_episodes(toy_users(3), per_user=1, shots=3, seed=4)
    examples, stats = tokenize_episodes(episodes, tok, options, shot_spans=True)
    if options.max_tokens:
        assert stats.shots_dropped > 0
    for ep, ex in zip(episodes, examples, strict=True):
        kept = ep.shots[len(ep.shots) - len(ex.shot_spans) :]
        assert [tok.decode(ex.tokens.prompt[a:b]) for a, b in ex.shot_spans] == [
            s.chosen.strip() + "\n" for s in kept
        ]
        batch = collate_targets([ex.tokens.prompt], [ex.tokens.chosen], tok.pad_token_id, [ex.shot_spans])
        lp = forward_logps(model, batch)
        ours = (-lp.sum / lp.count).item()
        assert ours == pytest.approx(_independent_loss(model, tok, ep, options), rel=1e-5)


def test_shot_loss_trains_and_scores_more_tokens(world: dict[str, Path], tmp_path: Path) -> None:
    def run(name: str, **kw: object):
        cfg = make_config(
            {
                **recipe("sft"),
                "model": str(world["llama"]),
                "episodes": str(world["train"]),
                "out": str(tmp_path / name),
                "batch_size": 4,
                "max_steps": 2,
                "log_every": 1,
                "progress": False,
                **kw,
            }
        )
        return train(cfg)

    plain, shots = run("plain"), run("shots", shot_loss=True)
    assert shots.steps == 2 and torch.isfinite(torch.tensor(shots.metrics["loss"]))
    # same batches, different targets: the per-token loss differs
    assert shots.metrics["loss"] != pytest.approx(plain.metrics["loss"])


def test_shot_loss_is_an_sft_option(world: dict[str, Path]) -> None:
    base = {"model": str(world["llama"]), "episodes": str(world["train"])}
    with pytest.raises(UserError, match="shot_loss"):
        make_config({**base, "stage": "fspo", "shot_loss": True})
    with pytest.raises(UserError, match="shot_loss"):
        make_config(
            {**base, "stage": "sft", "shot_loss": True, "logps_impl": "prefix", "questions_per_context": 2}
        )
