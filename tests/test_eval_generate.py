"""Generation with a tiny random Llama: batching, resume, modes, stopping and parsing."""

from __future__ import annotations

import json

import pytest

from fspo.core.errors import DataError, UserError
from fspo.data.template import (
    PREFERRED,
    TemplateOptions,
    render_generation_prompt,
    render_target,
    response_heading_ids,
)
from fspo.data.tokens import prompt_token_ids
from fspo.eval.generate import generate_for_episodes, partial_path
from fspo.infer.generate import answer_finished, prompt_ids


@pytest.fixture(scope="module")
def world(eval_users, eval_episodes, eval_lm):
    model, tok = eval_lm
    return eval_users, eval_episodes, model, tok


def test_batch_and_single_give_the_same_greedy_output(world):
    _, episodes, model, tok = world
    kw = {"max_new_tokens": 12, "seed": 0}
    batched = generate_for_episodes(model, tok, episodes, batch_size=8, **kw)
    single = generate_for_episodes(model, tok, episodes, batch_size=1, **kw)
    assert [r["raw"] for r in batched] == [r["raw"] for r in single]
    assert [r["episode_id"] for r in batched] == [e.episode_id for e in episodes]  # input order kept
    rec = batched[0]
    assert {
        "episode_id",
        "user_id",
        "question",
        "system",
        "answer",
        "description",
        "prompt_tokens",
        "split",
        "mode",
        "seed",
        "batch_size",
    } <= rec.keys()
    assert rec["system"] == "plain" and rec["new_tokens"] <= 12


def test_heading_ids_are_appended_after_prompt_ids(world):
    _, episodes, _, tok = world
    e = episodes[0]
    ids = prompt_ids(e, tok, "plain")
    text = render_generation_prompt(e.shots, e.query.question)
    heading = response_heading_ids(TemplateOptions(), tok)
    assert ids == prompt_token_ids(tok, text) + heading  # separately tokenized, as in training
    target = tok(render_target(e.query.chosen, TemplateOptions()), add_special_tokens=False)["input_ids"]
    assert target[: len(heading)] == heading  # the model continues where training targets go on
    rat = prompt_ids(e, tok, "rat")
    assert tok.decode(rat, skip_special_tokens=True).endswith(e.query.question + "\n")
    oracle = tok.decode(prompt_ids(e, tok, "oracle"), skip_special_tokens=True)
    assert "## User Description\n" + e.description in oracle and oracle.endswith(PREFERRED)


def test_shots_keeps_the_first_k(world):
    _, episodes, _, tok = world
    text = tok.decode(prompt_ids(episodes[0], tok, "plain", shots=1), skip_special_tokens=True)
    assert "# Example 1" in text and "# Example 2" not in text


def test_resume_skips_done_batches_and_writes_atomically(world, tmp_path):
    _, episodes, model, tok = world
    out = tmp_path / "gen.jsonl"
    kw = {"max_new_tokens": 6, "batch_size": 2}
    first = generate_for_episodes(model, tok, episodes[:3], out=out, **kw)
    assert len(out.read_text().splitlines()) == 3 and not partial_path(out).exists()
    both = generate_for_episodes(model, tok, episodes, out=out, **kw)
    assert both[:3] == first  # records already written are kept as they were
    assert [json.loads(x)["episode_id"] for x in out.read_text().splitlines()] == [
        e.episode_id for e in episodes
    ]
    calls = []
    original = model.generate

    def counting(*a, **k):
        calls.append(k["input_ids"].shape[0])
        return original(*a, **k)

    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]))  # one episode missing: only its batch (of 2) runs again
    model.generate = counting
    try:
        generate_for_episodes(model, tok, episodes, out=out, **kw)
    finally:
        del model.generate
    assert calls == [2] and out.read_bytes() == whole
    with pytest.raises(UserError, match="other settings"):
        generate_for_episodes(model, tok, episodes, out=out, max_new_tokens=7, batch_size=2)
    with pytest.raises(UserError, match="other settings"):  # the batch size decides the batches
        generate_for_episodes(model, tok, episodes, out=out, max_new_tokens=6, batch_size=3)


def test_rat_and_oracle_modes(world):
    users, episodes, model, tok = world
    rat = generate_for_episodes(model, tok, episodes[:2], mode="rat", max_new_tokens=8)
    assert all(r["mode"] == "rat" and "description" in r for r in rat)
    no_desc = [e.model_copy(update={"description": None}) for e in episodes[:2]]
    with pytest.raises(DataError, match="oracle mode needs"):
        generate_for_episodes(model, tok, no_desc, mode="oracle", max_new_tokens=4)
    users_map = {u.user_id: u for u in users}
    oracle = generate_for_episodes(model, tok, no_desc, mode="oracle", max_new_tokens=4, users=users_map)
    assert len(oracle) == 2


def test_sampling_is_seeded(world):
    _, episodes, model, tok = world
    kw = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9}
    a = generate_for_episodes(model, tok, episodes[:4], seed=3, **kw)
    b = generate_for_episodes(model, tok, episodes[:4], seed=3, **kw)
    assert [r["raw"] for r in a] == [r["raw"] for r in b]


def test_answer_finished_rules():
    assert not answer_finished("Take red.", rat=False)
    assert answer_finished("Take red.\n# Example 3", rat=False)
    assert answer_finished("# Task", rat=False)
    rat_text = "## User Description\nLikes red.\n## Preferred Response \nTake red."
    assert not answer_finished(rat_text, rat=True)  # the description's and answer's headings do not stop
    assert answer_finished(rat_text + "\n## Question \n", rat=True)
    assert not answer_finished("## User Description\nLikes", rat=True)


def test_stopping_criterion_stops_rows_independently(world):
    import torch

    from fspo.infer.generate import stopping_criteria

    _, _, _, tok = world
    prompt = tok("prompt", add_special_tokens=False)["input_ids"]
    rows = [
        prompt + tok("Take red.\n# Example", add_special_tokens=False)["input_ids"],
        prompt + tok("Take red and", add_special_tokens=False)["input_ids"],
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    done = stopping_criteria(tok, len(prompt), rat=False)(ids, None)
    assert done.tolist() == [True, False]


def test_rat_output_is_parsed(world, monkeypatch):
    """A scripted continuation stands in for a trained RAT model; parsing keeps the description."""
    _, episodes, model, tok = world
    script = "## User Description\nLoves red.\n## Preferred Response \nTake red.\n# Example 9\n"

    def fake_batch(model, tokenizer, batch, **kw):
        return [tokenizer(script, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]] * len(
            batch
        )

    monkeypatch.setattr("fspo.eval.generate.generate_batch", fake_batch)
    rec = generate_for_episodes(model, tok, episodes[:1], mode="rat", max_new_tokens=50)[0]
    assert rec["description"] == "Loves red." and rec["answer"] == "Take red."


def test_cli_prompts_in_the_layout_the_model_was_trained_with(world, tmp_path):
    """`fspo generate` reads the model's fspo_config.json: no dispreferred answers if trained without."""
    from typer.testing import CliRunner

    from fspo.cli import app
    from fspo.data.io import write_records
    from fspo.data.schema import Episode
    from fspo.data.template import TemplateOptions
    from fspo.infer.layout import trained_layout
    from fspo.train.config import CONFIG_FILE, TrainConfig

    _, episodes, model, tok = world
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    TrainConfig(model="m", episodes="e", include_dispreferred=False).save(folder / CONFIG_FILE)
    eps_file = tmp_path / "episodes.jsonl"
    write_records(eps_file, episodes[:2], Episode)
    assert trained_layout(folder).include_dispreferred is False
    assert trained_layout(folder, include_dispreferred=True).include_dispreferred is True
    assert trained_layout(tmp_path).include_dispreferred is True  # no config: the default layout

    def lengths(*extra):
        out = tmp_path / f"gen{len(extra)}.jsonl"
        args = ["generate", "--model", folder, "--episodes", eps_file, "--out", out, "--max-new-tokens", 2]
        args += extra
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return [json.loads(line)["prompt_tokens"] for line in out.read_text().splitlines()]

    no_dispreferred = TemplateOptions(include_dispreferred=False)
    trained = [len(prompt_ids(e, tok, options=no_dispreferred)) for e in episodes[:2]]
    default = [len(prompt_ids(e, tok)) for e in episodes[:2]]
    assert trained != default
    assert lengths() == trained
    assert lengths("--dispreferred") == default
