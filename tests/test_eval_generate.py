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
from fspo.eval.personal import loop_shares, repetition_loop
from fspo.infer.generate import Decoding, answer_finished, prompt_ids


@pytest.fixture(scope="module")
def world(eval_users, eval_episodes, eval_lm):
    model, tok = eval_lm
    return eval_users, eval_episodes, model, tok


def test_batch_and_single_give_the_same_greedy_output(world):
    _, episodes, model, tok = world
    kw = {"max_new_tokens": 12, "decoding": Decoding(seed=0)}
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
        "decoding",
        "batch_size",
    } <= rec.keys()
    assert rec["system"] == "plain" and rec["new_tokens"] <= 12
    assert rec["decoding"] == Decoding(seed=0).model_dump()  # the record says how it was decoded


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


def test_sampling_is_seeded_per_episode(world):
    """An episode's sampled answer depends on the seed alone: not on the batch size, nor on which
    other episodes are in the run."""
    _, episodes, model, tok = world
    sampled = Decoding(temperature=1.0, top_p=0.9, seed=3)

    def raws(eps, decoding=sampled, batch_size=8):
        kw = {"max_new_tokens": 10, "decoding": decoding, "batch_size": batch_size}
        return {r["episode_id"]: r["raw"] for r in generate_for_episodes(model, tok, eps, **kw)}

    whole = raws(episodes)
    assert raws(episodes) == whole
    assert raws(episodes, batch_size=1) == whole
    subset = raws(episodes[5:0:-2], batch_size=2)  # other batches, other order, other neighbours
    assert subset == {k: whole[k] for k in subset}
    other_seed = raws(episodes, Decoding(temperature=1.0, top_p=0.9, seed=4))
    assert sum(other_seed[k] != whole[k] for k in whole) >= len(whole) // 2
    assert raws(episodes, Decoding()) != whole  # greedy is another answer


def _kill_after(monkeypatch, batches: int) -> None:
    """The next run's `generate_batch` raises KeyboardInterrupt (a kill) after `batches` batches."""
    import fspo.eval.generate as gen

    real, calls = gen.generate_batch, []

    def killed(*args, **kwargs):
        if len(calls) == batches:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_batch", killed)


def test_killed_sampled_run_resumes_byte_identical(world, tmp_path, monkeypatch):
    _, episodes, model, tok = world
    decoding = Decoding(temperature=0.8, top_p=0.95, repetition_penalty=1.3, no_repeat_ngram_size=3, seed=5)
    kw = {"max_new_tokens": 12, "batch_size": 3, "decoding": decoding}
    straight = tmp_path / "straight.jsonl"
    generate_for_episodes(model, tok, episodes, out=straight, **kw)
    out = tmp_path / "killed.jsonl"
    with monkeypatch.context() as patch:
        _kill_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            generate_for_episodes(model, tok, episodes, out=out, **kw)
    assert not out.exists() and len(partial_path(out).read_text().splitlines()) == 3  # one batch logged
    generate_for_episodes(model, tok, episodes, out=out, **kw)
    assert out.read_bytes() == straight.read_bytes() and not partial_path(out).exists()
    with pytest.raises(UserError, match="other settings"):  # another decoding is not mixed in
        generate_for_episodes(model, tok, episodes, out=out, **{**kw, "decoding": Decoding(seed=5)})


def test_repetition_controls_count_the_answer_only(world):
    """No n-gram twice in an answer with no_repeat_ngram_size=n, while the answer may still repeat
    n-grams of its prompt (the shots' phrasing)."""
    from fspo.infer.generate import generate_batch

    _, episodes, model, tok = world
    prompts = [prompt_ids(e, tok) for e in episodes[:4]]
    kw = {"rat": False, "max_new_tokens": 40}
    plain = generate_batch(model, tok, prompts, **kw)
    banned = generate_batch(model, tok, prompts, decoding=Decoding(no_repeat_ngram_size=2), **kw)

    def bigrams(ids):
        return list(zip(ids, ids[1:], strict=False))

    assert any(len(set(bigrams(ids))) < len(bigrams(ids)) for ids in plain)  # greedy repeats itself
    for ids in banned:
        assert len(set(bigrams(ids))) == len(bigrams(ids))
    # Columns before `answer_start` (the prompt) ban nothing and are not penalized.
    import torch

    from fspo.infer.generate import logits_processors

    ids = torch.tensor([[5, 6, 7, 9, 5, 8, 5]])  # prompt 5 6 7 9 | answer 5 8 5
    strict = Decoding(no_repeat_ngram_size=2, repetition_penalty=2.0)
    scores = torch.ones(1, 10)
    for proc in logits_processors(strict, 4, [0]):
        scores = proc(ids, scores)
    # 5 -> 6 occurs in the prompt only, 5 -> 8 in the answer: only 8 is banned; only 5 and 8 penalized
    assert scores[0, 8] == float("-inf") and scores[0, 5] == 0.5
    assert scores[0, [6, 7, 9]].tolist() == [1.0, 1.0, 1.0]


def test_bad_decoding_values_are_refused_naming_the_field():
    for values, field in [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0, "temperature": 1.0}, "top_p"),
        ({"top_p": 1.5, "temperature": 1.0}, "top_p"),
        ({"repetition_penalty": 0.8}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"top_k": 5}, "top_k"),
    ]:
        with pytest.raises(UserError, match=rf"where: invalid decoding: field '{field}'"):
            Decoding.of("where", **values)
    assert Decoding(top_p=0.9) == Decoding()  # greedy has no top-p: recorded as 1


def test_cli_refuses_bad_decoding_naming_the_option(tmp_path):
    from conftest import run_typer
    from fspo.cli import app

    base = ["generate", "--model", tmp_path, "--episodes", tmp_path, "--out", tmp_path / "g.jsonl"]
    code, message = run_typer(app, *base, "--repetition-penalty", "0.5")
    assert code == 2 and "fspo generate: invalid decoding: field 'repetition_penalty'" in message
    code, message = run_typer(app, *base, "--top-p", "0", "--temperature", "1")
    assert code == 2 and "field 'top_p'" in message
    code, message = run_typer(app, *base, "--best-of", "4")
    assert code == 2 and "best-of-4 needs sampled decoding" in message
    code, message = run_typer(app, *base, "--ref", tmp_path)
    assert code == 2 and "--ref" in message and "--best-of" in message


@pytest.mark.parametrize(
    ("text", "loop"),
    [
        ("ha " * 12, True),
        ("I love it. " * 4, True),
        ("This phone has a great battery life. " * 2 + "Buy it.", True),
        ("Great phone. " + "The the THE " * 4, True),
        ("ha " * 11, False),  # under 12 words
        ("very very good, a very good phone with a very very long battery life", False),
        ("A good phone. It is fast. A good phone. The battery lasts a day, the screen is bright.", False),
        ("- Buy red.\n- Buy blue.\n- Buy green.\n- Buy gold.\n- Buy teal.\n- Buy pink.", False),
        ("", False),
    ],
)
def test_repetition_loop(text, loop):
    assert repetition_loop(text) is loop


def test_loop_shares_per_system_and_split():
    rows = [
        {"system": "a", "split": "test_unseen", "answer": "ha " * 20},
        {"system": "a", "split": "test_unseen", "answer": "A fine answer."},
        {"system": "a", "split": "test_seen", "answer": "A fine answer."},
        {"system": "b", "answer": "I love it. " * 5},
    ]
    assert loop_shares(rows) == {
        "a": {
            "test_seen": {"loop_share": 0.0, "loops": 0, "n": 1},
            "test_unseen": {"loop_share": 0.5, "loops": 1, "n": 2},
        },
        "b": {"all": {"loop_share": 1.0, "loops": 1, "n": 1}},
    }


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
