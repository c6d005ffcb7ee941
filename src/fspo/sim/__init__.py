"""Simulated user populations with exact rewards: the project's ground truth.

Three domains mirror the paper's (roleplay, reviews, elix). Each simulated user is a persona with
a reward ``r_u(question, text)`` computed from surface features of any string, so the same function
labels the training preferences and judges a model's generated answers.

Public API::

    data = simulate("roleplay", n_users=1500, prefs_per_user=100, seed=0)
    write_sim("runs/sim", data)              # users.jsonl, preferences.jsonl, sim_meta.json
    r = reward_for(user)                     # r(question, text) -> float, from the User record alone
    texts = corpus("roleplay", seed=0, n=50_000)
    stats(data); disagreement_matrix(data.users, data.preferences)
"""

from fspo.sim.base import SimData
from fspo.sim.corpus import corpus
from fspo.sim.export import read_sim, write_sim
from fspo.sim.registry import domain_names, get_domain, register_domain
from fspo.sim.reward import prefer, reward_for
from fspo.sim.simulate import simulate
from fspo.sim.stats import Disagreement, disagreement_matrix, stats

__all__ = [
    "Disagreement",
    "SimData",
    "corpus",
    "disagreement_matrix",
    "domain_names",
    "get_domain",
    "prefer",
    "read_sim",
    "register_domain",
    "reward_for",
    "simulate",
    "stats",
    "write_sim",
]
