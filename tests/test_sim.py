"""Simulated users: labels follow the exact reward, rewards rebuild from records, splits hold out."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fspo.core.errors import UserError
from fspo.data.episodes import build_episodes
from fspo.data.schema import Preference, User
from fspo.data.template import TASK, TASK_PLAIN
from fspo.sim import corpus, disagreement_matrix, get_domain, prefer, reward_for, simulate, stats
from fspo.sim.roleplay import HELD_OUT, held_out_pairs, phrase_for
from fspo.sim.text import words

SMALL = {
    "roleplay": {"topics": 6},
    "reviews": {"movies": 12},
    "elix": {},
}


@pytest.fixture(scope="module")
def population():
    """The default roleplay population (1,500 personas); few preferences keep it fast."""
    return simulate("roleplay", 1500, 4, seed=0)


def _round_trip(user: User) -> User:
    return User.model_validate_json(user.model_dump_json())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(domain=st.sampled_from(sorted(SMALL)), seed=st.integers(0, 2**31 - 1))
def test_every_label_agrees_with_the_users_exact_reward(domain: str, seed: int) -> None:
    data = simulate(domain, 6, 15, seed=seed, **SMALL[domain])
    margin = get_domain(domain).options.margin
    rewards = {u.user_id: (reward_for(u), reward_for(_round_trip(u))) for u in data.users}
    users = {u.user_id: _round_trip(u) for u in data.users}
    assert data.preferences
    for p in data.preferences:
        r, r_json = rewards[p.user_id]
        chosen, rejected = r(p.question, p.chosen), r(p.question, p.rejected)
        assert chosen - rejected >= margin - 1e-9
        assert (chosen, rejected) == (r_json(p.question, p.chosen), r_json(p.question, p.rejected))
        assert prefer(users[p.user_id], p.question, p.chosen, p.rejected) == 1.0


@settings(max_examples=60, deadline=None)
@given(question=st.text(max_size=200), text=st.text(max_size=2000))
def test_rewards_are_defined_on_arbitrary_strings(question: str, text: str) -> None:
    for domain in SMALL:
        value = reward_for(_USERS[domain])(question, text)
        assert isinstance(value, float) and math.isfinite(value)


_USERS = {d: simulate(d, 3, 2, seed=3, **SMALL[d]).users[0] for d in SMALL}


@pytest.mark.parametrize("domain", sorted(SMALL))
def test_rewards_on_extreme_strings_and_off_topic_garbage(domain: str) -> None:
    data = simulate(domain, 5, 5, seed=2, **SMALL[domain])
    huge = ("haha! for example - be careful? " * 20_000) + "\n- x" * 1000
    for user in data.users:
        r = reward_for(user)
        for text in ("", " ", "\n\n", "???", "!!!!!!!!", huge, "\x00\ud7ff漢字"):
            assert math.isfinite(r("", text)) and math.isfinite(r(data.preferences[0].question, text))
    # Relevance is shared by every user: the same answer with its topic words blanked out loses.
    topic = _topic_words(domain)
    for user in data.users:
        r = reward_for(user)
        for p in [p for p in data.preferences if p.user_id == user.user_id][:3]:
            off_topic = re.sub(r"[A-Za-z]+", lambda m: "zzz" if m[0].lower() in topic else m[0], p.chosen)
            assert r(p.question, off_topic) < r(p.question, p.chosen)


def _topic_words(domain: str) -> set[str]:
    from fspo.sim import elix, reviews, roleplay_words

    if domain == "roleplay":
        return {w for t, objs in roleplay_words.TOPICS.items() for w in (t, *objs)}
    if domain == "reviews":
        return {w.lower() for w in (*reviews.ADJECTIVES, *reviews.NOUNS, *reviews.GENRES)}
    return set(elix.CONCEPTS)


def test_test_users_hold_combinations_no_training_user_has(population) -> None:
    train = [u for u in population.users if u.metadata["split"] == "train"]
    test = [u for u in population.users if u.metadata["split"] == "test"]
    assert 0.15 <= len(test) / len(population.users) <= 0.25
    assert all(held_out_pairs(u.metadata["traits"]) for u in test)
    train_pairs = set()
    for u in train:
        values = [(t, s["value"]) for t, s in u.metadata["traits"].items()]
        train_pairs |= {(a, b) for a in values for b in values}
    for combo in HELD_OUT:
        assert combo not in train_pairs and combo[::-1] not in train_pairs
    seen_in_test = {c for u in test for c in held_out_pairs(u.metadata["traits"])}
    assert len(seen_in_test) == len(HELD_OUT)  # every held-out combination is actually tested


def test_descriptions_name_every_active_trait(population) -> None:
    for u in population.users:
        traits = u.metadata["traits"]
        assert 2 <= len(traits) <= 4
        for trait, spec in traits.items():
            assert phrase_for(trait, spec["value"]) in u.description
    example = {"length": "short", "format": "bullets", "tone": "casual", "viewpoint": "practical"}
    dom = get_domain("roleplay")
    text = dom.describe({t: {"value": v, "weight": 1.0} for t, v in example.items()})
    assert (
        text == "This user prefers short answers in bullet points, with a casual tone and practical advice."
    )


def test_refinement_makes_personas_decisive(population) -> None:
    refined = [u for u in population.users if u.metadata["refinements"] > 0]
    assert 0 < len(refined) < len(population.users)
    assert population.info["refined_personas"] == len(refined)


def test_users_disagree_on_shared_pairs() -> None:
    data = simulate("roleplay", 300, 60, seed=4)
    dis = disagreement_matrix(data.users, data.preferences)
    off = dis.matrix[~np.eye(len(dis.labels), dtype=bool)]
    assert np.nanmax(off) > 0.6 and np.nanmin(off) < np.nanmax(off)
    assert dis.contested_pairs > 0.5
    # Directly: two users with opposite values of one trait label some shared pair oppositely.
    by_pair: dict[tuple[str, str, str], dict[str, str]] = {}
    for p in data.preferences:
        key = (p.question, *sorted((p.chosen, p.rejected)))
        by_pair.setdefault(key, {})[p.user_id] = p.chosen
    assert any(len(set(labels.values())) > 1 for labels in by_pair.values())
    per_user = disagreement_matrix(data.users, data.preferences, group_by="user", max_groups=300)
    assert per_user.matrix.shape == (300, 300)


def test_reviews_and_elix_hold_out_interpolated_users() -> None:
    reviews = simulate("reviews", 200, 5, seed=0, movies=20)
    for u in reviews.users:
        assert (len(u.metadata["traits"]) > 1) == (u.metadata["split"] == "test")
    assert {u.metadata["group"] for u in reviews.users if u.metadata["split"] == "test"} <= {
        "positive+concise", "positive+verbose", "negative+concise", "negative+verbose"
    }  # fmt: skip
    elix = simulate("elix", 200, 5, seed=0)
    for u in elix.users:
        level = u.metadata["traits"]["level"]["value"]
        assert (level % 1 == 0.5) == (u.metadata["split"] == "test")
    assert {u.metadata["split"] for u in elix.users} == {"train", "test"}


def test_elix_level_estimate_orders_written_levels() -> None:
    from fspo.sim.elix import SENTENCES, estimate_level

    means = [
        np.mean([estimate_level(s.format(c="gravity", C="Gravity")) for s in SENTENCES[lv]])
        for lv in range(5)
    ]
    assert means == sorted(means) and means[0] < 0.5 and means[4] > 3.5
    assert estimate_level("") == 0.0


def test_roleplay_detectors_read_the_surface() -> None:
    dom = get_domain("roleplay")
    q = "How can I get better at cooking?"

    def f(text: str) -> dict[str, float]:
        return dict(zip(dom.columns, dom.featurize(q, text), strict=True))

    plain = f("Practice cooking daily with your recipes.")
    assert plain["format=prose"] == 1 and plain["length=short"] == 1 and plain["relevance"] == 1
    assert plain["viewpoint=practical"] == 1 and plain["viewpoint=historical"] == 0
    rich = f(
        "- Hey, in my experience cooking is fun!\n- For example, try spices!\n"
        "- Be careful, haha, a funny joke.\nWhat will you try first?"
    )
    assert rich["format=bullets"] == 1 and rich["tone=casual"] == 1 and rich["tone=formal"] == -1
    assert rich["examples=yes"] == rich["enthusiasm=yes"] == rich["followup=yes"] == 1
    assert rich["first_person=yes"] == rich["humor=yes"] == rich["caveat=yes"] == 1
    assert f("banana " * 100)["length=long"] == 1 and f("banana")["relevance"] == 0


def test_same_seed_same_population_other_seed_differs() -> None:
    a = simulate("roleplay", 20, 10, seed=7, topics=10)
    b = simulate("roleplay", 20, 10, seed=7, topics=10)
    c = simulate("roleplay", 20, 10, seed=8, topics=10)
    dump = lambda d: [r.model_dump() for r in (*d.users, *d.preferences)]  # noqa: E731
    assert dump(a) == dump(b)
    assert dump(a) != dump(c)


def test_records_are_valid_and_answers_regular(population) -> None:
    data = simulate("roleplay", 50, 40, seed=5)
    for p in data.preferences:
        Preference.model_validate(p.model_dump())
        assert 8 <= len(words(p.chosen)) <= 60
    s = stats(data)
    assert 200 <= s["vocabulary"] <= 2000
    assert s["preferences"] == 50 * 40 and s["splits"].keys() <= {"train", "test"}


def test_corpus_is_deterministic_small_language() -> None:
    docs = corpus("roleplay", seed=0, n=500)
    assert len(docs) == 500 and docs == corpus("roleplay", seed=0, n=500)
    assert any(d.startswith("This user prefers") for d in docs)
    assert len({w for d in docs for w in words(d)}) < 2000
    assert len(corpus("elix", seed=1, n=50)) == 50


def test_described_documents_answer_as_their_description_says() -> None:
    """Each described document states its author's description, then an answer written to it."""
    from fspo.data.template import DESCRIPTION, RESPONSE

    fmt = {"traits": ["format"], "min_traits": 1, "max_traits": 1}
    mix = {"descriptions": 0.0, "consistent": 1.0, "consistent_answers": 3, "described": 0.5}
    docs = corpus("roleplay", seed=0, n=200, **mix, **fmt)
    described = [d for d in docs if DESCRIPTION in d]
    assert 60 <= len(described) <= 140  # about half, drawn per document
    follows, shown = [], set()
    for doc in described:
        description = doc.split(DESCRIPTION)[1].split("\n")[0]
        answer = doc.rsplit(RESPONSE, 1)[1]
        shown.add(doc.count("# Example "))
        follows.append(answer.startswith("- ") == ("bullet points" in description))
    assert shown == {0, 1, 2}  # 0 to all-but-one of the author's answers come first as examples
    # The author picks the best answer of the question's pool, which has the author's format unless
    # the shared relevance term outweighs it.
    assert sum(follows) / len(follows) > 0.8
    with pytest.raises(UserError, match="described"):
        corpus("roleplay", n=10, described=1.5)


def test_bad_input_raises_user_error() -> None:
    with pytest.raises(UserError, match="unknown sim domain"):
        simulate("nope", 1, 1, seed=0)
    with pytest.raises(UserError, match="bogus"):
        simulate("roleplay", 1, 1, seed=0, bogus=3)
    with pytest.raises(UserError):
        simulate("roleplay", 0, 1, seed=0)
    with pytest.raises(UserError, match="not a simulated user"):
        reward_for(User(user_id="u"))
    with pytest.raises(UserError, match="unknown roleplay trait"):
        reward_for(
            User(
                user_id="u", metadata={"domain": "roleplay", "traits": {"tone": {"value": "x", "weight": 1}}}
            )
        )


def test_traits_option_restricts_what_personas_care_about() -> None:
    data = simulate("roleplay", 40, 5, seed=1, traits=("format", "length"), min_traits=1, max_traits=2)
    cared = {t for u in data.users for t in u.metadata["traits"]}
    assert cared == {"format", "length"}
    with pytest.raises(UserError, match="unknown traits"):
        simulate("roleplay", 2, 2, traits=("colour",))
    with pytest.raises(UserError, match="max_traits"):
        simulate("roleplay", 2, 2, traits=("format",), max_traits=2)


def test_styled_documents_keep_one_style_and_contrast_it():
    """Writer documents: every answer of a document has the same style (format, enthusiasm, first
    person), writers differ; `contrast` adds a dispreferred answer per example; other domains say
    they have no writer."""

    def style(answer: str) -> tuple[bool, ...]:
        return (answer.startswith("- "), "!" in answer, "in my experience" in answer.lower())

    seen = set()
    for doc in corpus("roleplay", seed=3, n=30, descriptions=0, styled=1.0, styled_answers=3):
        answers = [part.split("\n\n")[0].strip() for part in doc.split("## Response \n")[1:]]
        assert len(answers) == 3
        assert len({style(a) for a in answers}) == 1, answers
        seen.add(style(answers[0]))
    assert len(seen) > 3
    docs = corpus(
        "roleplay", seed=3, n=30, descriptions=0, styled=1.0, styled_answers=3, styled_layout="contrast"
    )
    assert all(d.count("## Preferred Response") == d.count("## Dispreferred Response") == 3 for d in docs)
    # `task`: the same writers' answers, the last one where an FSPO prompt asks for the answer.
    examples = corpus("roleplay", seed=4, n=20, descriptions=0, styled=1.0, styled_answers=3)
    tasks = corpus(
        "roleplay", seed=4, n=20, descriptions=0, styled=1.0, styled_answers=3, styled_layout="task"
    )
    for ex, task in zip(examples, tasks, strict=True):
        shots, last = ex.split("# Example 3\n")
        assert task == shots + f"{TASK}{TASK_PLAIN}\n" + last.rstrip("\n") + "\n"
    assert len(corpus("elix", n=10, descriptions=0, styled=0.5)) == 10  # every domain has a writer


def test_a_writer_keeps_one_style_across_questions() -> None:
    import random

    from fspo.sim.reviews import write_review

    rng = random.Random(5)
    reviews = get_domain("reviews")
    for sentiment in ("positive", "negative"):
        lengths = {}
        for verbose in (False, True):
            texts = [
                write_review("The Lost River", "drama", rng, (sentiment, "plot", verbose)) for _ in range(8)
            ]
            signs = {np.sign(reviews.featurize("", t)[0]) for t in texts}
            assert signs == {1.0 if sentiment == "positive" else -1.0}
            lengths[verbose] = [len(t.split()) for t in texts]
        assert min(lengths[True]) > max(lengths[False])
    elix = get_domain("elix")
    levels = set()
    for _ in range(8):
        write = elix.writer(rng)
        found = [elix.featurize(q, write(i))[0] for i, q in enumerate(elix.questions()[:6])]
        assert max(found) - min(found) <= 1.0, found  # one level's vocabulary and sentence length
        levels.add(round(found[0]))
    assert len(levels) > 2  # writers differ from each other
    with pytest.raises(UserError, match="styled must be a share"):
        corpus("roleplay", n=10, consistent=0.8, styled=0.5)
    assert len(corpus("roleplay", n=10, consistent=0.8, styled=0.1)) == 10  # 0.1 + 0.8 + 0.1 is 1 in decimal


def test_minimal_pairs_change_one_trait_and_are_decided_by_it() -> None:
    """`pairing="minimal"`: each pair is an answer and a copy with one trait changed. The flipped
    trait's features differ (length's unless both texts are past its ramp); no other trait's do,
    except the count-based ones an added or removed sentence moves (length, bullet lines, '!'
    marks). A one-trait population's every preference then names the user's value."""
    dom = get_domain("roleplay", pairing="minimal", topics=6)
    traits = dom.options.traits
    incidental = {"length", "format", "enthusiasm"}
    for qi in range(0, len(dom.questions()), 5):
        pool, pairs = dom.answer_pairs(qi, random.Random(qi))
        assert len(pairs) == dom.options.answers_per_question * len(traits)
        feats = dom.features(dom.questions()[qi], pool)
        for k, (a, b) in enumerate(pairs):
            flipped = traits[k % len(traits)]
            moved = {dom.columns[i].split("=")[0] for i in np.flatnonzero(feats[a] != feats[b])}
            assert flipped in moved or flipped == "length", (pool[a], pool[b])
            assert moved - {flipped} <= incidental, (flipped, moved, pool[a], pool[b])
    one_trait = {"traits": ("format",), "min_traits": 1, "max_traits": 1}
    data = simulate("roleplay", 30, 10, seed=2, topics=6, pairing="minimal", **one_trait)
    assert len(data.preferences) == 300
    users = {u.user_id: u.metadata["traits"]["format"]["value"] for u in data.users}
    assert set(users.values()) == {"bullets", "prose"}
    for p in data.preferences:
        assert p.chosen.startswith("- ") == (users[p.user_id] == "bullets"), p
        assert _unbulleted(p.chosen) == _unbulleted(p.rejected)
    default = simulate("roleplay", 5, 3, seed=2, topics=6)
    assert default.info["pair_bank"] == 6 * 4 * 28  # pool pairing: every pair of 8 answers


def test_holdout_by_user_leaves_the_split_to_the_episode_sampler() -> None:
    """`holdout="users"`: a one-trait population has no held-out combinations, so no user is marked
    and `build_episodes` holds out `test_user_fraction` of them, every one with unseen episodes."""
    one_trait = {"traits": ("format", "enthusiasm"), "min_traits": 1, "max_traits": 1, "min_decided": 0.05}
    marked = simulate("roleplay", 40, 8, seed=1, topics=6, pairing="minimal", **one_trait)
    assert {u.metadata["split"] for u in marked.users} == {"train"}  # nothing to hold out
    data = simulate("roleplay", 40, 8, seed=1, topics=6, pairing="minimal", holdout="users", **one_trait)
    assert all("split" not in u.metadata for u in data.users)
    assert [p.model_dump() for p in data.preferences] == [p.model_dump() for p in marked.preferences]
    splits = build_episodes(data.preferences, data.users, shots=2, test_user_fraction=0.25, seed=0)
    assert len(splits.report.test_users) == 10
    unseen = {e.user_id for e in splits["test_unseen"]}
    assert unseen == set(splits.report.test_users)
    assert unseen.isdisjoint(e.user_id for e in splits["train"])


def _unbulleted(text: str) -> str:
    return text.replace("- ", "").replace("\n", " ")


def test_reviews_minimal_pairs_change_one_trait_each() -> None:
    from fspo.sim.reviews import minimal_review_pairs

    reviews = get_domain("reviews")
    pool, pairs = minimal_review_pairs("The Lost River", "drama", 6, random.Random(1))
    assert len(pairs) == 18 and len(pool) == 24
    cols = reviews.columns
    for a, b in pairs:
        fa, fb = (
            np.array(reviews.featurize("Write a review of the drama movie The Lost River.", t))
            for t in (pool[a], pool[b])
        )
        changed = {
            "sentiment": np.sign(fa[cols.index("sentiment=positive")])
            != np.sign(fb[cols.index("sentiment=positive")]),
            "focus": (fa[cols.index("focus=acting")] > fa[cols.index("focus=plot")])
            != (fb[cols.index("focus=acting")] > fb[cols.index("focus=plot")]),
            "length": (fa[cols.index("length=verbose")] > 0.5) != (fb[cols.index("length=verbose")] > 0.5),
        }
        assert sum(changed.values()) == 1, (pool[a], pool[b], changed)
    data = simulate("reviews", 40, 20, 0, pairing="minimal")
    assert len(data.preferences) == 40 * 20


# --- Domain.ideal_reward: the ceiling of any answer's reward -------------------------------------------

IDEAL_POOLS = {"roleplay": [{"topics": 4}, {"topics": 4, "pairing": "minimal"}],
               "reviews": [{"movies": 4}, {"movies": 4, "pairing": "minimal"}],
               "elix": [{"test_fraction": 0.5}]}  # fmt: skip


@pytest.mark.parametrize("domain", sorted(IDEAL_POOLS))
def test_ideal_reward_bounds_the_reward_of_every_pooled_answer(domain: str) -> None:
    users = simulate(domain, 20, 2, seed=5, **IDEAL_POOLS[domain][0]).users
    for options in IDEAL_POOLS[domain]:
        dom, rng = get_domain(domain, **options), random.Random(1)
        for qi, question in enumerate(dom.questions()[:8]):
            pool, _ = dom.answer_pairs(qi, rng)
            feats = dom.features(question, pool)
            for user in users:
                traits = user.metadata["traits"]
                best = float(dom.score(traits, feats).max())
                assert best <= dom.ideal_reward(traits, question) + 1e-9


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=400) | st.sampled_from(["!!! - haha?\n- lol!", "- a\n- b\n- c!!?"]))
def test_ideal_reward_bounds_the_reward_of_arbitrary_strings(text: str) -> None:
    for domain, user in _USERS.items():
        dom, traits = get_domain(domain), user.metadata["traits"]
        question = dom.questions()[0]
        assert dom.reward(traits, question, text) <= dom.ideal_reward(traits, question) + 1e-9


def test_ideal_features_put_the_users_values_at_their_top_and_the_other_values_at_their_bottom() -> None:
    reviews = get_domain("reviews")
    traits = {
        "sentiment": {"value": "negative", "weight": 1.1},
        "length": {"value": "concise", "weight": 0.9},
    }
    row = dict(zip(reviews.columns, reviews.ideal_features(traits, reviews.questions()[0]), strict=True))
    assert row == {
        "sentiment=positive": -1.0,  # a signed column: its bottom is -1
        "sentiment=negative": 1.0,
        "length=concise": 1.0,
        "length=verbose": 0.0,
        "focus=acting": 0.0,  # a trait the user does not weigh
        "focus=plot": 0.0,
        "relevance": 1.0,
    }
    assert reviews.ideal_reward(traits, reviews.questions()[0]) == pytest.approx(1.1 + 0.9 + 2.0)
    elix = get_domain("elix")
    assert list(elix.ideal_features({"level": {"value": 2.5, "weight": 1.0}}, "")) == [2.5, 1.0]
    assert elix.ideal_reward({"level": {"value": 2.5, "weight": 1.0}}, "") == 2.0
