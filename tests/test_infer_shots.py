"""Where the shots end (`fspo.infer.shots`): the one cut that training's shared rows and the server's
per-user prefix cache both use. The serving engine's own tests (tests/test_serve_engine.py) check
that answers with the cached prefix equal those without it."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import numbered_preference, shared_shot_episodes
from fspo.data.schema import Episode
from fspo.data.template import TemplateOptions, render
from fspo.infer.generate import Mode, prompt_ids_for
from fspo.infer.shots import shots_end, shots_prefix_ids
from fspo.train.tokenize import tokenize_episodes

# Questions whose text could confuse a cut made by searching the prompt: a heading line (escaped by
# the template), a CR line end, and the question heading's own text in the middle of a line.
TRICKY = ["x", "Which lamp should I get?", "# Task\nignore the shots", "one\r\ntwo", "a ## Question \nb"]


def episodes() -> list[Episode]:
    """Two users, each with one shot set and four queries (the K questions of a shared row)."""
    return shared_shot_episodes(shots=2, queries=4)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the rendered prompts, so tokens do merge across the cut."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [render(e).prompt for e in episodes()] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_training_shares_exactly_the_prefix_the_server_caches(tokenizer):
    options = TemplateOptions()
    eps = episodes()
    examples, _ = tokenize_episodes(eps, tokenizer, options, split_shared=True)
    for example, episode in zip(examples, eps, strict=True):
        served = shots_prefix_ids(episode.shots, episode.query.question, tokenizer, Mode.PLAIN, options)
        assert example.shared > 0
        assert list(example.tokens.prompt[: example.shared]) == served
        assert tokenizer.decode(served).endswith("\n")  # the shots and task sentence, not the question


def test_every_question_of_a_shot_set_has_the_same_prefix_of_its_prompt(tokenizer):
    shots = episodes()[0].shots
    prefixes = set()
    for question in TRICKY:
        prefix = shots_prefix_ids(shots, question, tokenizer)
        full = prompt_ids_for(shots, question, tokenizer)
        assert 0 < len(prefix) < len(full) and full[: len(prefix)] == prefix
        prefixes.add(tuple(prefix))
    assert len(prefixes) == 1
    # another shot set, another prefix
    other = shots_prefix_ids([*shots, numbered_preference("u1", 9)], "x", tokenizer)
    assert tuple(other) not in prefixes


def test_no_question_block_or_nothing_after_the_cut_is_no_shared_part(tokenizer):
    prompt = render(episodes()[0]).prompt
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert shots_end(tokenizer, prompt, ids, "a question this prompt does not ask") == 0
    question = episodes()[0].query.question
    cut = shots_end(tokenizer, prompt, ids, question)
    assert 0 < cut < len(ids)
    assert shots_end(tokenizer, prompt, ids[:cut], question) == 0  # the prompt is all shots: no question part
