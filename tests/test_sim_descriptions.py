"""Descriptions both ways: `Domain.read_description` inverts `describe`, and `persona_of` names the
persona a rejected answer was written for (RAT's rejected target)."""

from __future__ import annotations

import pytest

from fspo.sim import get_domain, simulate
from fspo.sim.base import SEVERAL

POPULATIONS = {
    "roleplay": {},
    "roleplay-minimal": {"pairing": "minimal", "traits": ["format", "enthusiasm"], "min_decided": 0.05,
                         "min_traits": 1, "max_traits": 1, "holdout": "users"},
    "reviews": {"pairing": "minimal"},
    "elix": {},
}  # fmt: skip


@pytest.mark.parametrize("name", POPULATIONS)
def test_read_description_inverts_describe(name: str) -> None:
    domain = name.split("-")[0]
    data = simulate(domain, n_users=300, prefs_per_user=2, seed=3, **POPULATIONS[name])
    dom = get_domain(domain, **POPULATIONS[name])
    for user in data.users:
        traits = user.metadata["traits"]
        assert dom.read_description(user.description) == {t: s["value"] for t, s in traits.items()}, user


def test_read_description_of_free_text() -> None:
    roleplay, reviews, elix = (get_domain(d) for d in ("roleplay", "reviews", "elix"))
    assert roleplay.read_description("Likes SHORT answers in bullet points and a bit of humor!") == {
        "length": "short",
        "format": "bullets",
        "humor": "yes",
    }
    # Both values of one trait named: neither is the user's value.
    assert roleplay.read_description("answers in bullet points or in plain prose") == {"format": SEVERAL}
    assert roleplay.read_description("no examples please") == {"examples": "no"}
    assert roleplay.read_description("The user is kind.") == {}
    assert reviews.read_description("This user prefers long negative reviews.") == {
        "length": "verbose",
        "sentiment": "negative",
    }
    assert elix.read_description("explain at the high school level") == {"level": 2.0}
    assert elix.read_description("between the college and expert levels") == {"level": 3.5}
    assert elix.read_description("at the expert level, or at the college level") == {"level": SEVERAL}


@pytest.mark.parametrize("name", ["roleplay", "roleplay-minimal", "reviews", "elix"])
def test_rejected_description_names_the_rejected_answers_persona(name: str) -> None:
    """Where the rejected description changes a trait, the rejected answer carries less of the
    user's value than the chosen one; ELIX names the rejected answer's own (whole) level."""
    domain = name.split("-")[0]
    data = simulate(domain, n_users=40, prefs_per_user=5, seed=1, **POPULATIONS[name])
    dom = get_domain(domain, **POPULATIONS[name])
    users = {u.user_id: u for u in data.users}
    differs = 0
    for pref in data.preferences:
        user = users[pref.user_id]
        traits = user.metadata["traits"]
        named = dom.read_description(pref.rejected_description)
        assert set(named) == set(traits)
        chosen, rejected = dom.features(pref.question, [pref.chosen, pref.rejected])
        for trait, value in named.items():
            if domain == "elix":
                assert value == round(rejected[0])
            elif value != traits[trait]["value"]:
                own = dom.columns.index(f"{trait}={traits[trait]['value']}")
                assert rejected[own] < chosen[own]
        differs += pref.rejected_description != user.description
    if name != "reviews":  # minimal roleplay pairs flip a trait of the user's; ELIX levels are whole
        assert differs == len(data.preferences)


def test_minimal_pair_flips_mostly_one_trait_of_the_description() -> None:
    opts = {"pairing": "minimal", "min_traits": 2, "max_traits": 3}
    data = simulate("roleplay", n_users=30, prefs_per_user=6, seed=2, **opts)
    dom = get_domain("roleplay", **opts)
    users = {u.user_id: u for u in data.users}
    changed = []
    for pref in data.preferences:
        mine = dom.read_description(users[pref.user_id].description)
        theirs = dom.read_description(pref.rejected_description)
        changed.append(sum(mine[t] != theirs[t] for t in mine))
    # A flip can move a second feature a little (a caveat sentence makes an answer longer).
    assert min(changed) == 1 and changed.count(1) >= 0.9 * len(changed)
