"""Personalized best-of-N on a tiny Llama: the pick, its scores against plain forward passes, the
seeds, the records, resume and the reference a model folder names."""

from __future__ import annotations

import json

import pytest
import torch

from fspo.core.errors import UserError
from fspo.data.template import TemplateOptions, render_generation_prompt, render_target
from fspo.data.tokens import prompt_token_ids, target_token_ids
from fspo.eval.generate import generate_for_episodes, partial_path
from fspo.infer.best_of import SELF, Reference, best_of_n, check_best_of, training_reference
from fspo.infer.generate import Decoding
from fspo.infer.layout import CONFIG_FILE

SAMPLED = Decoding(temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def world(eval_episodes, eval_lm):
    from fspo.testing import tiny_llama

    model, tok = eval_lm
    ref = tiny_llama(tok, seed=1, max_position_embeddings=1024).eval()  # another model, same tokenizer
    return eval_episodes, model, tok, ref


def _logp(model, prompt: list[int], target: list[int]) -> float:
    """log π(target | prompt) from one plain forward pass over prompt + target."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target])).logits[0].float()
    steps = logits[len(prompt) - 1 : -1].log_softmax(-1)
    return float(steps.gather(1, torch.tensor(target)[:, None]).sum())


@pytest.mark.parametrize("kind", ["trained", "self"])
def test_best_of_picks_the_argmax_of_the_implicit_reward(world, kind):
    episodes, model, tok, ref = world
    e = episodes[0]
    reference = Reference(ref, "ref", beta=0.5) if kind == "trained" else Reference(None, SELF)
    kw = {"n": 4, "decoding": SAMPLED, "key": e.episode_id, "max_new_tokens": 12}
    result = best_of_n(model, tok, e.shots, e.query.question, reference=reference, **kw)
    assert len(set(result.answers)) > 1  # sampled: the candidates differ

    opts = TemplateOptions()
    prompt = prompt_token_ids(tok, render_generation_prompt(e.shots, e.query.question, opts))
    # A trained model's reference sees the prompt it was trained on; a model that is its own reference
    # differs from it by the shots.
    no_shots = prompt_token_ids(tok, render_generation_prompt([], e.query.question, opts))
    ref_prompt = prompt if kind == "trained" else no_shots
    ref_model = ref if kind == "trained" else model
    direct = []
    for answer in result.answers:
        target = target_token_ids(tok, render_target(answer, opts))
        direct.append(reference.beta * (_logp(model, prompt, target) - _logp(ref_model, ref_prompt, target)))
    assert result.rewards == pytest.approx(direct, abs=1e-4)
    assert result.best == max(range(4), key=direct.__getitem__)
    assert result.generated_tokens == sum(map(len, result.new_ids))


def test_zero_shot_model_that_is_its_own_reference_scores_every_sample_zero(world):
    episodes, model, tok, _ = world
    e = episodes[1]
    kw = {"n": 3, "decoding": SAMPLED, "key": e.episode_id, "max_new_tokens": 8}
    result = best_of_n(model, tok, [], e.query.question, reference=Reference(None, SELF), **kw)
    assert result.rewards == [0.0, 0.0, 0.0] and result.best == 0


def test_samples_nest_and_the_first_is_plain_sampling(world):
    """Sample j is drawn from the episode's j-th seed: best-of-2's samples are best-of-4's first two,
    and sample 0 is the answer one sampled decoding gives."""
    episodes, model, tok, _ = world
    e = episodes[2]
    kw = {"decoding": SAMPLED, "key": e.episode_id, "max_new_tokens": 10, "reference": Reference(None, SELF)}
    four = best_of_n(model, tok, e.shots, e.query.question, n=4, **kw)
    two = best_of_n(model, tok, e.shots, e.query.question, n=2, **kw)
    assert two.new_ids == four.new_ids[:2]
    plain = generate_for_episodes(model, tok, episodes[:4], max_new_tokens=10, decoding=SAMPLED)[2]
    assert plain["raw"] == four.raws[0]


def test_records_keep_every_candidate_and_a_killed_run_resumes_byte_identical(world, tmp_path, monkeypatch):
    import fspo.eval.generate as gen

    episodes, model, tok, ref = world
    eps = episodes[:3]
    kw = {"max_new_tokens": 8, "decoding": SAMPLED, "best_of": 3, "reference": Reference(ref, "ref", 0.5)}
    straight = tmp_path / "straight.jsonl"
    records = generate_for_episodes(model, tok, eps, out=straight, **kw)
    for rec in records:
        rewards = [c["reward"] for c in rec["candidates"]]
        assert len(rewards) == 3 and rec["best_index"] == rewards.index(max(rewards))
        assert rec["answer"] == rec["candidates"][rec["best_index"]]["answer"]
        assert rec["generated_tokens"] == sum(c["new_tokens"] for c in rec["candidates"])
        assert rec["scored_tokens"] > 2 * rec["generated_tokens"] / 3
        assert (rec["best_of"], rec["reference"], rec["beta"]) == (3, "ref", 0.5)
        assert rec["decoding"] == SAMPLED.model_dump()

    out = tmp_path / "killed.jsonl"
    real, calls = gen.best_of_n, []

    def killed(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(gen, "best_of_n", killed)
        with pytest.raises(KeyboardInterrupt):
            generate_for_episodes(model, tok, eps, out=out, **kw)
    assert len(partial_path(out).read_text().splitlines()) == 2
    generate_for_episodes(model, tok, eps, out=out, **kw)
    assert out.read_bytes() == straight.read_bytes() and not partial_path(out).exists()
    with pytest.raises(UserError, match="other settings"):  # another N is another result
        generate_for_episodes(model, tok, eps, out=out, **{**kw, "best_of": 2})


def test_best_of_refuses_what_it_cannot_rank():
    check_best_of(1, Decoding(), "rat")  # one answer: nothing to rank, any decoding
    with pytest.raises(UserError, match="best-of-4 needs sampled decoding"):
        check_best_of(4, Decoding(), "plain")
    with pytest.raises(UserError, match="not rat"):
        check_best_of(4, SAMPLED, "rat")
    with pytest.raises(UserError, match="at least 1"):
        check_best_of(0, SAMPLED, "plain")


def test_training_reference_reads_the_model_folder(tmp_path):
    from fspo.train.config import TrainConfig

    start = tmp_path / "sft"
    start.mkdir()
    trained = tmp_path / "fspo"
    trained.mkdir()
    assert training_reference(trained) == (None, 1.0)  # no training record: its own reference
    assert training_reference(trained, ref=start) == (str(start), 1.0)
    TrainConfig(model=str(start), episodes="e", beta=0.3).save(trained / CONFIG_FILE)
    assert training_reference(trained) == (str(start), 0.3)
    assert training_reference(trained, ref=tmp_path) == (str(tmp_path), 0.3)
    TrainConfig(model=str(tmp_path / "gone"), episodes="e").save(trained / CONFIG_FILE)
    with pytest.raises(UserError, match=r"fspo_config.json'?: field 'model'.*pass --ref PATH"):
        training_reference(trained)


def test_cli_best_of_scores_against_the_training_reference(world, tmp_path):
    from conftest import run_typer
    from fspo.cli import app
    from fspo.data.io import write_records
    from fspo.data.schema import Episode
    from fspo.train.config import TrainConfig

    episodes, model, tok, ref = world
    folders = {"policy": model, "ref": ref}
    for name, m in folders.items():
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    TrainConfig(model=str(tmp_path / "ref"), episodes="e", beta=0.25).save(tmp_path / "policy" / CONFIG_FILE)
    eps_file = tmp_path / "episodes.jsonl"
    write_records(eps_file, episodes[:2], Episode)
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", tmp_path / "policy", "--episodes", eps_file, "--out", out]
    args += ["--max-new-tokens", 6, "--temperature", 1, "--best-of", 2, "--no-dispreferred"]
    code, message = run_typer(app, *args)
    assert code == 0, message
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = (str(tmp_path / "ref"), 0.25, 2)  # the reference and β its fspo_config.json names
    assert [(r["reference"], r["beta"], len(r["candidates"])) for r in rows] == [expected] * 2
