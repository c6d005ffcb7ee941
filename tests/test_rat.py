"""RAT that learns descriptions: rejected-persona descriptions in training, description pairs (v2),
and the measures of description quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_typer
from fspo.core.errors import UserError
from fspo.data.episodes import build_episodes, load_episodes
from fspo.data.template import DescriptionMode, TemplateOptions, render
from fspo.eval.personal import NOT_NAMED, description_quality
from fspo.sim import get_domain, simulate
from fspo.sim.base import SEVERAL
from fspo.train import rat_pairs as rp
from fspo.train.tokenize import tokenize_episodes

OPTS = {"pairing": "minimal", "traits": ["format", "enthusiasm"], "min_traits": 2, "max_traits": 2}
RAT = TemplateOptions(description=DescriptionMode.TARGET)
ONLY = TemplateOptions(description=DescriptionMode.ONLY)


@pytest.fixture(scope="module")
def population():
    data = simulate("roleplay", n_users=12, prefs_per_user=8, seed=5, min_decided=0.05, **OPTS)
    splits = build_episodes(data.preferences, data.users, shots=2, seed=0, test_user_fraction=0.0)
    return data, splits["train"][:6]


def _flip(description: str, which: str) -> str:
    swaps = {
        "format": ("in bullet points", "in plain prose"),
        "enthusiasm": ("lots of enthusiasm", "a calm voice"),
    }
    a, b = swaps[which]
    return description.replace(a, "\0").replace(b, a).replace("\0", b)


class ScriptedSamples:
    """Stands in for `generate_batch`: each episode's rows are scripted from its true description."""

    def __init__(self, tokenizer, script, fail_after: int | None = None):
        self.tokenizer, self.script, self.fail_after, self.calls = tokenizer, script, fail_after, 0
        self.descriptions: list[str] = []

    def __call__(self, model, tokenizer, rows, **kwargs):
        assert kwargs["description_only"] and kwargs["rat"] and kwargs["decoding"].temperature > 0
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # a kill between batches
        self.calls += 1
        k = len(self.script(""))
        out = []
        for _ in range(0, len(rows), k):
            for text in self.script(self.descriptions.pop(0)):
                out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        return out


def _texts(true: str) -> list[str]:
    """Four samples: right, one trait wrong, both wrong, and no description heading at all."""
    return [
        f"## User Description\n{true}\n## Preferred Response \n",
        f"## User Description\n{_flip(true, 'format')}\n## Pref",
        f"## User Description\n{_flip(_flip(true, 'format'), 'enthusiasm')}\n",
        "This is not a description at all\n# Example",
    ]


def _run(population, tmp_path, monkeypatch, tiny_llama_folder, script=_texts, sampled=None, **kwargs):
    """`build_rat_pairs` with scripted samples; `sampled`: the episodes whose rows the scripted model
    is asked for, in order (default all: a resumed run asks only for those not done)."""
    from fspo.models.loading import load_tokenizer

    _, episodes = population
    tokenizer = load_tokenizer(tiny_llama_folder)
    fake = ScriptedSamples(tokenizer, script, kwargs.pop("fail_after", None))
    fake.descriptions = [e.description for e in (episodes if sampled is None else sampled)]
    monkeypatch.setattr(rp, "generate_batch", fake)
    stats = rp.build_rat_pairs(
        None,
        tokenizer,
        episodes,
        tmp_path,
        scorer=rp.description_scorer("traits:roleplay"),
        samples=4,
        batch_size=2,
        options=RAT,
        **kwargs,
    )
    return stats, fake


def test_pairs_from_known_trait_values(population, tmp_path, monkeypatch, tiny_llama_folder) -> None:
    _, episodes = population
    stats, _ = _run(population, tmp_path, monkeypatch, tiny_llama_folder)
    pairs = load_episodes(tmp_path / "train.jsonl")
    assert len(pairs) == len(episodes) == stats["pairs"] and stats["ties_left_out"] == 0
    assert stats["true_description_chosen"] == 0  # a sample was right: the tie goes to the sample
    # Scores: right 1, one of two traits wrong (1 - 1) / 2 = 0, both wrong -1, nothing named 0.
    assert stats["mean_score"] == pytest.approx(0.0) and stats["perfect_share"] == 0.25
    for pair, episode in zip(pairs, episodes, strict=True):
        worst = _flip(_flip(episode.description, "format"), "enthusiasm")
        assert (pair.description, pair.query.rejected_description) == (episode.description, worst)
        assert pair.metadata["description_scores"] == [1.0, -1.0]
        assert pair.metadata["true_description"] == episode.description
        # As trained (`--rat description`): the prompt of RAT, then the two descriptions alone.
        out = render(pair, ONLY)
        assert out.prompt == render(episode, RAT).prompt
        assert (out.chosen, out.rejected) == (
            f"## User Description\n{episode.description}\n",
            f"## User Description\n{worst}\n",
        )
        # In the official RAT layout each description is followed by its answer.
        out = render(pair, RAT)
        chosen, rejected = episode.query.chosen, episode.query.rejected
        assert out.chosen == f"## User Description\n{episode.description}\n## Preferred Response \n{chosen}\n"
        assert out.rejected == f"## User Description\n{worst}\n## Preferred Response \n{rejected}\n"
    assert json.loads((tmp_path / "rat_pairs.json").read_text())["pairs"] == len(episodes)
    assert not (tmp_path / "samples.partial").exists()


def test_the_true_description_is_a_candidate_unless_left_out(
    population, tmp_path, monkeypatch, tiny_llama_folder
) -> None:
    """A model that writes the same wrong description every time: no pair among its samples alone;
    with the true description among the candidates, the truth is chosen and its mistake rejected."""
    _, episodes = population

    def same_wrong(true: str) -> list[str]:
        return [f"## User Description\n{_flip(true, 'format')}\n"] * 4

    stats, _ = _run(
        population, tmp_path / "a", monkeypatch, tiny_llama_folder, same_wrong, include_true=False
    )
    assert (stats["pairs"], stats["ties_left_out"]) == (0, len(episodes))
    stats, _ = _run(population, tmp_path / "b", monkeypatch, tiny_llama_folder, same_wrong)
    assert stats["pairs"] == stats["true_description_chosen"] == len(episodes)
    pair = load_episodes(tmp_path / "b" / "train.jsonl")[0]
    assert (pair.description, pair.query.rejected_description) == (
        episodes[0].description,
        _flip(episodes[0].description, "format"),
    )


def test_killed_sampling_resumes_where_it_stopped(
    population, tmp_path, monkeypatch, tiny_llama_folder
) -> None:
    whole = tmp_path / "whole"
    _run(population, whole, monkeypatch, tiny_llama_folder)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _run(population, cut, monkeypatch, tiny_llama_folder, fail_after=2)
    assert len((cut / "samples.partial").read_text().splitlines()) == 1 + 4  # settings + 2 batches of 2
    _, episodes = population
    # Only the last batch is sampled again.
    _, fake = _run(population, cut, monkeypatch, tiny_llama_folder, sampled=episodes[4:])
    assert fake.calls == 1
    assert (cut / "train.jsonl").read_bytes() == (whole / "train.jsonl").read_bytes()
    (cut / "samples.partial").write_text(json.dumps({"settings": {"samples": 9}}) + "\n")
    with pytest.raises(UserError, match="other settings"):
        _run(population, cut, monkeypatch, tiny_llama_folder)


def test_a_real_model_samples_descriptions_only(population, tmp_path, tiny_llama_folder) -> None:
    """The tiny untrained model: sampling stops at the description (or the token budget), and every
    pair is a valid RAT episode the trainer can read."""
    from fspo.models.loading import load_model, load_tokenizer

    _, episodes = population
    stats = rp.build_rat_pairs(
        load_model(tiny_llama_folder),
        load_tokenizer(tiny_llama_folder),
        episodes,
        tmp_path,
        scorer=lambda inferred, true: [
            float(len(set(i.split()) & set(t.split()))) for i, t in zip(inferred, true, strict=True)
        ],
        samples=2,
        max_new_tokens=12,
        batch_size=3,
    )
    assert stats["episodes"] == len(episodes) and stats["pairs"] > 0  # the truth beats word salad
    for pair in load_episodes(tmp_path / "train.jsonl"):
        render(pair, RAT)


def test_description_scorer_specs() -> None:
    roleplay = rp.description_scorer("traits:roleplay")
    true = "This user prefers answers in bullet points, with a calm voice."
    assert roleplay(["answers in bullet points", "in plain prose with a calm voice", true], [true] * 3) == [
        0.5,
        0.0,
        1.0,
    ]
    for bad in ("traits", "cosine", "traits:nowhere"):
        with pytest.raises(UserError):
            rp.description_scorer(bad)


def test_embedding_similarity_ranks_paraphrases_above_other_users() -> None:
    score = rp.description_scorer("embedding")
    true = "This user prefers answers in bullet points."
    same, paraphrase, other = score(
        [true, "The user likes answers written as a bulleted list.", "This user wants a calm voice."],
        [true] * 3,
    )
    assert same == pytest.approx(1.0, abs=1e-5) and 1.0 > paraphrase > other
    with pytest.raises(UserError, match="not a sentence-transformers model folder"):
        rp.description_scorer("embedding:/no/such/folder")


def test_render_stats_count_rejected_targets_without_their_persona(population, tiny_llama_folder) -> None:
    from fspo.models.loading import load_tokenizer

    _, episodes = population
    unknown = [
        e.model_copy(update={"query": e.query.model_copy(update={"rejected_description": None})})
        for e in episodes[:2]
    ]
    _, stats = tokenize_episodes([*unknown, *episodes[2:]], load_tokenizer(tiny_llama_folder), RAT)
    assert stats.summary()["rejected_description_own"] == 2
    tokenizer = load_tokenizer(tiny_llama_folder)
    examples, stats = tokenize_episodes(unknown, tokenizer, ONLY)
    assert stats.rejected_description_own == 2  # description pairs without a rejected one: no pair
    # A description alone is not the end of the model's turn (the answer follows): no eos after it.
    assert (
        examples[0].tokens.chosen
        == tokenizer(render(unknown[0], ONLY).chosen, add_special_tokens=False)["input_ids"]
    )
    examples, _ = tokenize_episodes(unknown, tokenizer, RAT)
    assert examples[0].tokens.chosen[-1] == tokenizer.eos_token_id
    _, stats = tokenize_episodes(unknown, load_tokenizer(tiny_llama_folder), TemplateOptions())
    assert stats.rejected_description_own == 0  # no RAT: no description targets at all


def test_description_quality_per_trait_confusion_and_following(population) -> None:
    data, _ = population
    users = {u.user_id: u for u in data.users}
    user = data.users[0]
    traits = user.metadata["traits"]
    dom = get_domain("roleplay")
    fmt = traits["format"]["value"]
    bullets = "- one point\n- another point"
    prose = "One point, and another point."
    records = [
        # Right description; the answer is in the described format.
        {"user_id": user.user_id, "question": "q", "description": user.description,
         "answer": bullets if fmt == "bullets" else prose, "system": "fspo-rat", "split": "test_unseen"},
        # Format flipped, enthusiasm not named, an extra trait (tone) named.
        {"user_id": user.user_id, "question": "q", "system": "fspo-rat", "split": "test_unseen",
         "description": ("answers in plain prose" if fmt == "bullets" else "answers in bullet points")
         + " with a formal tone", "answer": "x"},
        {"user_id": user.user_id, "question": "q", "system": "fspo-rat", "split": "test_unseen",
         "description": "in bullet points or in plain prose", "answer": "x"},
    ]  # fmt: skip
    q = description_quality(users, records)["test_unseen"]
    assert q["records"] == 3 and q["values"] == 6
    assert q["named"] == pytest.approx(2 / 6, abs=1e-4)  # the first record names both values right
    assert q["per_trait"]["format"] == {"accuracy": pytest.approx(1 / 3, abs=1e-4), "n": 3}
    other = "prose" if fmt == "bullets" else "bullets"
    assert q["confusion"]["format"] == {fmt: {fmt: 1, other: 1, SEVERAL: 1}}
    ent = str(traits["enthusiasm"]["value"])
    assert q["confusion"]["enthusiasm"] == {ent: {ent: 1, NOT_NAMED: 2}}
    assert q["extra_per_record"] == pytest.approx(1 / 3, abs=1e-4)
    assert dom.read_description(records[0]["description"])["format"] == fmt
    assert q["follows"] is not None and 0 < q["stated"] <= 2 + 2


def test_rat_pairs_cli_says_what_is_wrong(tmp_path: Path) -> None:
    from fspo.train.cli import app

    code, out = run_typer(
        app, "rat-pairs", "--model", str(tmp_path), "--episodes", str(tmp_path), "--out", str(tmp_path / "o"),
        "--similarity", "cosine",
    )  # fmt: skip
    assert code == 2 and "use traits:<domain> or embedding" in out


def test_a_model_trained_on_description_pairs_answers_in_rat_layout(tmp_path: Path) -> None:
    """`--rat description` trains on descriptions alone; the model then generates and is scored in
    RAT's layout (description, then answer), as the model it started from."""
    from fspo.infer.layout import trained_layout
    from fspo.train.config import make_config

    folder = tmp_path / "model"
    folder.mkdir()
    cfg = make_config({"model": "m", "episodes": "e", "out": "o", "stage": "fspo", "rat": "description"})
    assert cfg.template_options().description is DescriptionMode.ONLY
    cfg.save(folder / "fspo_config.json")
    assert trained_layout(folder).description is DescriptionMode.TARGET
