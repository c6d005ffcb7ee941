"""`fspo.eval.personal` and `Domain.carried`: which trait values an answer carries, the share of them a
system's answers carry, and the Bayes ceiling of what a user's shots can tell."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fspo.core.errors import UserError
from fspo.data.episodes import build_episodes
from fspo.data.schema import User
from fspo.eval.judges import ExactRewardJudge
from fspo.eval.personal import shot_ceiling, trait_shares, winrate_ceiling
from fspo.eval.stats import wilson_interval
from fspo.sim import get_domain, simulate
from fspo.sim.elix import LEXICON, estimate_level, write_explanation
from fspo.sim.roleplay_words import TOPICS


def _traits(**values: str | float) -> dict:
    return {t: {"value": v, "weight": 1.0} for t, v in values.items()}


def _carried(domain_name: str, traits: dict, question: str, text: str) -> list[bool]:
    domain = get_domain(domain_name)
    return domain.carried(traits, domain.features(question, [text])[0])


# --- Domain.carried on hand-written texts -------------------------------------------------------------

BULLETED_EXCITED = (
    "- Practice a new dish every week!\n- Taste as you go, it is great!\n- Keep your knives sharp!"
)
CALM_PROSE = "Practice a new dish every week. Taste as you go, and keep your knives sharp."


def test_roleplay_bullets_and_exclamations_carry_format_bullets_and_enthusiasm_and_prose_the_opposite():
    question = get_domain("roleplay").questions()[0]
    lively = _traits(format="bullets", enthusiasm="yes")
    calm = _traits(format="prose", enthusiasm="no")
    assert _carried("roleplay", lively, question, BULLETED_EXCITED) == [True, True]
    assert _carried("roleplay", calm, question, BULLETED_EXCITED) == [False, False]
    assert _carried("roleplay", calm, question, CALM_PROSE) == [True, True]
    assert _carried("roleplay", lively, question, CALM_PROSE) == [False, False]
    # Per trait, in the persona's order: prose with exclamations carries enthusiasm, not bullets.
    mixed = "Practice a new dish every week! Taste as you go! Keep your knives sharp."
    assert _carried("roleplay", lively, question, mixed) == [False, True]


def test_reviews_a_positive_concise_review_carries_positive_and_concise_not_negative_or_verbose():
    question = get_domain("reviews").questions()[0]
    review = "The Silent River is wonderful and the cast is superb."
    assert _carried("reviews", _traits(sentiment="positive", length="concise"), question, review) == [
        True,
        True,
    ]
    assert _carried("reviews", _traits(sentiment="negative", length="verbose"), question, review) == [
        False,
        False,
    ]
    assert _carried("reviews", _traits(sentiment="positive", length="verbose"), question, review) == [
        True,
        False,
    ]


def test_elix_a_level_two_feature_row_carries_level_two_and_two_and_a_half_not_level_zero():
    domain = get_domain("elix")
    level_two = np.array([2.0, 1.0])  # columns: level, relevance
    assert domain.carried(_traits(level=2.0), level_two) == [True]
    assert domain.carried(_traits(level=2.5), level_two) == [True]  # between 2 and 3: within half a level
    assert domain.carried(_traits(level=0.0), level_two) == [False]
    assert domain.carried(_traits(level=1.0), level_two) == [False]


def test_elix_a_written_level_two_explanation_carries_a_level_two_user_not_a_level_zero_one():
    rng = random.Random(0)
    question = get_domain("elix").questions()[0]
    for _ in range(5):
        text = write_explanation("photosynthesis", 2, rng)
        assert _carried("elix", _traits(level=2.0), question, text) == [True]
        assert _carried("elix", _traits(level=0.0), question, text) == [False]
        # A level-3 explanation is what a 2.5 user is carried by (and what its reward prefers).
        assert _carried(
            "elix", _traits(level=2.5), question, write_explanation("photosynthesis", 3, rng)
        ) == [True]


def test_elix_carried_follows_the_level_the_reward_measures():
    # The simulator measures a text's level with one estimator (`estimate_level`), the same one every
    # user's reward reads; it reads written level-2 text at ~1.9 and level-3 text at ~2.7. A user at
    # 2.5 therefore prefers level-3 text, and `carried` credits exactly the texts within half a level
    # of 2.5 by that measure: what the user's own reward favours, not what the writer meant.
    rng = random.Random(0)
    elix = get_domain("elix")
    question = elix.questions()[0]
    for level in (2, 3):
        for text in (write_explanation("photosynthesis", level, rng) for _ in range(5)):
            measured = estimate_level(text)
            assert _carried("elix", _traits(level=2.5), question, text) == [abs(measured - 2.5) <= 0.5]


# --- trait_shares on hand-made records ----------------------------------------------------------------


def _user(uid: str, domain: str, traits: dict) -> User:
    return User(user_id=uid, metadata={"domain": domain, "traits": traits})


def test_trait_shares_one_for_answers_in_each_users_style_zero_for_the_opposite_style():
    question = get_domain("roleplay").questions()[0]
    users = {
        "lively": _user("lively", "roleplay", _traits(format="bullets", enthusiasm="yes")),
        "calm": _user("calm", "roleplay", _traits(format="prose", enthusiasm="no")),
    }
    styled = {"lively": BULLETED_EXCITED, "calm": CALM_PROSE}
    opposite = {"lively": CALM_PROSE, "calm": BULLETED_EXCITED}
    records = [
        {"user_id": uid, "question": question, "answer": answers[uid], "system": system, "split": split}
        for system, answers in (("personal", styled), ("contrary", opposite), ("same", styled | {"calm": ""}))
        for uid in users
        for split in ("test_unseen", "test_seen")
    ]
    records = [r for r in records if r["answer"]]  # "same": one answer for the lively user only
    shares = trait_shares(users, records)
    for split in ("test_unseen", "test_seen"):
        assert shares["personal"][split]["trait_share"] == 1.0
        assert shares["personal"][split]["n"] == 2
        assert shares["contrary"][split]["trait_share"] == 0.0
        assert shares["same"][split] == {
            "trait_share": 1.0,
            "relevance": shares["same"][split]["relevance"],
            "n": 1,
        }
        # The answers name cooking's topic or objects only by chance; relevance is a share either way.
        assert 0.0 <= shares["personal"][split]["relevance"] <= 1.0


def test_trait_shares_averages_per_answer_shares_and_names_an_unknown_user():
    question = get_domain("reviews").questions()[0]
    users = {"u": _user("u", "reviews", _traits(sentiment="positive", length="verbose"))}
    concise_positive = "The Silent River is wonderful and the cast is superb."
    rec = {
        "user_id": "u",
        "question": question,
        "answer": concise_positive,
        "system": "s",
        "split": "test_unseen",
    }
    assert trait_shares(users, [rec])["s"]["test_unseen"]["trait_share"] == 0.5  # positive, not verbose
    with pytest.raises(UserError, match="'ghost'"):
        trait_shares(users, [rec | {"user_id": "ghost"}])


# --- shot_ceiling on small simulated populations ------------------------------------------------------

ROLEPLAY = dict(
    pairing="minimal",
    traits=["format", "enthusiasm", "tone", "first_person"],
    min_traits=2,
    max_traits=3,
    min_decided=0.05,
    holdout="combinations",
)


def _population(domain: str, shots: int, **options):
    data = simulate(domain, n_users=80, prefs_per_user=20, seed=0, **options)
    splits = build_episodes(data.preferences, data.users, shots=shots, seed=0)
    users = {u.user_id: u for u in data.users}
    return users, {s: splits[s] for s in ("test_unseen", "test_seen")}


@pytest.fixture(scope="module")
def elix_population():
    return _population("elix", 4, test_fraction=0.3)


@pytest.fixture(scope="module")
def roleplay_population():
    return _population("roleplay", 8, **ROLEPLAY)


@pytest.mark.parametrize("population, shots", [("elix_population", 4), ("roleplay_population", 8)])
def test_shot_ceiling_rises_with_shots_and_train_only_hypotheses_know_less(request, population, shots):
    users, episodes = request.getfixturevalue(population)
    assert episodes["test_unseen"], "the population has unseen users"
    full = shot_ceiling(users, episodes, max_shots=shots)
    train = shot_ceiling(users, episodes, max_shots=shots, hypotheses="train")
    for curve in (full, train):
        assert set(curve) == {"test_unseen", "test_seen"}
        for split, points in curve.items():
            assert list(points) == [str(n) for n in range(shots + 1)]
            for p in points.values():
                assert 0.0 <= p["ci_low"] <= p["accuracy"] <= p["ci_high"] <= 1.0
                assert p["n"] == len(episodes[split])
    unseen, top = full["test_unseen"], str(shots)
    assert unseen["0"]["accuracy"] < unseen[top]["accuracy"]
    # Knowing only the training personas (no unseen combination among the hypotheses) never helps.
    assert train["test_unseen"][top]["accuracy"] <= unseen[top]["accuracy"]


def test_shot_ceiling_with_fewer_max_shots_is_the_same_curve_cut_short(elix_population):
    users, episodes = elix_population
    full = shot_ceiling(users, episodes, max_shots=4)
    cut = shot_ceiling(users, episodes, max_shots=2)
    assert cut == {split: {n: p for n, p in curve.items() if int(n) <= 2} for split, curve in full.items()}


@pytest.mark.parametrize("eps", [0.0, 0.5, -0.1, 1.2])
def test_shot_ceiling_refuses_label_noise_outside_zero_to_a_half(elix_population, eps):
    users, episodes = elix_population
    with pytest.raises(UserError, match="eps"):
        shot_ceiling(users, episodes, max_shots=2, eps=eps)


def test_shot_ceiling_refuses_users_that_are_not_simulated():
    with pytest.raises(UserError, match="simulated user"):
        shot_ceiling({"u": User(user_id="u")}, {"test_unseen": []}, max_shots=2)


# --- winrate_ceiling: an ideal answer against an opponent's ---------------------------------------------


def _value(traits: dict, trait: str) -> object:
    return traits.get(trait, {}).get("value")


def _ideal_review(traits: dict, question: str) -> str:
    """Names the title, two words of the user's sentiment and focus, and pads to the user's length."""
    title = question.split(" movie ")[1].rstrip(".")
    sentiment = {"positive": " is wonderful and brilliant", "negative": " is dull and awful"}
    focus = {"acting": ", with its cast and acting", "plot": ", with its plot and story"}
    text = f"{title}{sentiment.get(_value(traits, 'sentiment'), '')}{focus.get(_value(traits, 'focus'), '')}."
    while _value(traits, "length") == "verbose" and len(text.split()) < 45:
        text += " It runs for about two hours."
    return text


def _ideal_roleplay(traits: dict, question: str) -> str:
    """Two sentences naming the topic and its objects, in the user's format, tone, voice and enthusiasm."""
    topic = get_domain("roleplay").topic_of(question)
    opener = {"casual": "Honestly, ", "formal": "Indeed, "}.get(_value(traits, "tone"), "")
    voice = "I think " if _value(traits, "first_person") == "yes" else ""
    end = "!" if _value(traits, "enthusiasm") == "yes" else "."
    sentences = [
        f"{opener}{voice}{topic} needs {TOPICS[topic][0]}{end}",
        f"{topic} needs {TOPICS[topic][1]}{end}",
    ]
    if _value(traits, "format") == "bullets":
        return "\n".join(f"- {s}" for s in sentences)
    return " ".join(sentences)


def _ideal_explanation(traits: dict, question: str) -> str:
    """One sentence at exactly the user's level: lexicon words of the levels around it, 6 + 4L words."""
    level = float(_value(traits, "level"))
    lexicon = [sorted(LEXICON[int(level)])[0], sorted(LEXICON[int(level + 0.5)])[-1]]
    concept = get_domain("elix").keywords(question)[0]
    return " ".join([concept, *lexicon] + ["the"] * (3 + int(4 * level))) + "."


IDEAL_WRITERS = {
    "reviews": ({"movies": 6}, _ideal_review),
    "roleplay": ({"topics": 3, **ROLEPLAY}, _ideal_roleplay),
    "elix": ({"test_fraction": 0.5}, _ideal_explanation),
}


def _ceiling_population(domain: str):
    """A few simulated users of `domain` and a generation record per preference: the chosen answer."""
    options, write = IDEAL_WRITERS[domain]
    data = simulate(domain, n_users=12, prefs_per_user=3, seed=1, **options)
    dom = get_domain(domain)
    users = {u.user_id: u for u in data.users}
    split = {"test": "test_unseen", "train": "test_seen"}
    records = [
        {
            "user_id": p.user_id,
            "question": p.question,
            "answer": p.chosen,
            "system": "opponent",
            "split": split[dom.split(users[p.user_id].metadata["traits"])],
        }
        for p in data.preferences
    ]
    return dom, users, records, write


@pytest.mark.parametrize("domain", sorted(IDEAL_WRITERS))
def test_an_answer_carrying_every_value_and_relevant_reaches_the_ideal_reward(domain):
    dom, users, records, write = _ceiling_population(domain)
    for rec in records:
        traits = users[rec["user_id"]].metadata["traits"]
        text = write(traits, rec["question"])
        assert all(dom.carried(traits, dom.features(rec["question"], [text])[0])), text
        ideal = dom.ideal_reward(traits, rec["question"])
        assert dom.reward(traits, rec["question"], text) == pytest.approx(ideal)


@pytest.mark.parametrize("domain", sorted(IDEAL_WRITERS))
def test_winrate_ceiling_is_the_exact_judges_win_rate_of_ideal_answers_against_the_opponent(domain):
    dom, users, records, write = _ceiling_population(domain)
    ceiling = winrate_ceiling(users, records)
    assert set(ceiling) == {"all", "unseen", "seen"}  # the win rates' split names
    judge = ExactRewardJudge()
    names = {"all": None, "unseen": "test_unseen", "seen": "test_seen"}
    for split, cell in ceiling.items():
        mine = [r for r in records if names[split] in (None, r["split"])]
        verdicts = [
            judge.prefer(users[r["user_id"]], r["question"], write(users[r["user_id"]].metadata["traits"],
                         r["question"]), r["answer"])
            for r in mine
        ]  # fmt: skip
        assert cell["n"] == len(mine)
        assert cell["win_rate"] == pytest.approx(sum(verdicts) / len(verdicts), abs=1e-4)
        assert cell["ci"] == pytest.approx(list(wilson_interval(sum(verdicts), len(verdicts))), abs=1e-4)
        assert cell["ci"][0] <= cell["win_rate"] <= cell["ci"][1]


@pytest.mark.parametrize("domain", sorted(IDEAL_WRITERS))
def test_winrate_ceiling_is_a_half_against_ideal_answers_and_one_against_empty_ones(domain):
    _, users, records, write = _ceiling_population(domain)
    ideal = [r | {"answer": write(users[r["user_id"]].metadata["traits"], r["question"])} for r in records]
    assert {cell["win_rate"] for cell in winrate_ceiling(users, ideal).values()} == {0.5}
    empty = [r | {"answer": ""} for r in records]
    assert {cell["win_rate"] for cell in winrate_ceiling(users, empty).values()} == {1.0}


def test_winrate_ceiling_refuses_several_systems_and_unknown_users():
    _, users, records, _ = _ceiling_population("reviews")
    with pytest.raises(UserError, match="several systems"):
        winrate_ceiling(users, [records[0], records[1] | {"system": "other"}])
    with pytest.raises(UserError, match="'ghost'"):
        winrate_ceiling(users, [records[0] | {"user_id": "ghost"}])
