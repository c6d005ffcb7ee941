"""CONTRIBUTING.md's recipes, done once: a fourth domain and a new baseline, declared here, outside
src/, run through `fspo quickstart --profile tiny` and `fspo paper` with no file of the package edited."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

import pytest

from fspo.eval import systems
from fspo.eval.systems import System, Training, register_system, register_training
from fspo.paper import run_paper
from fspo.quickstart import load_profile, run_quickstart
from fspo.sim import registry as sim_registry
from fspo.sim.base import RELEVANCE, Domain, Persona

PLACES = ["Oslo", "Lima", "Cairo", "Perth", "Quito", "Hanoi", "Dakar", "Bergen", "Tunis", "Lyon",
          "Porto", "Riga", "Sucre", "Turin", "Malmo", "Nice"]  # fmt: skip
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy", "humid", "cloudy"]


class WeatherToy(Domain):
    """Users who like weather reports short or long, calm or excited. Training users care about one
    of the two; unseen users about both (new combinations, as the paper's Reviews)."""

    name = "weather-toy"
    columns = (RELEVANCE, "length=short", "length=long", "tone=calm", "tone=excited")
    description_patterns: ClassVar[dict[str, dict[str, str]]] = {
        "length": {"short": r"\bshort\b", "long": r"\blong\b"},
        "tone": {"calm": r"\bcalm\b", "excited": r"\bexcited\b"},
    }
    # Its profile layer: a population of its own options, and no pretraining documents that need a
    # fixed-style writer (this domain has none).
    quickstart_profile: ClassVar[dict[str, Any]] = {"sim_options": {}, "corpus_styled": 0.0, "shots": 2}

    def questions(self) -> list[str]:
        return [f"What is the weather like in {place}?" for place in PLACES]

    def answers(self, question_index: int, rng: Any) -> list[str]:
        place = PLACES[question_index]

        def write() -> str:
            end = rng.choice(".!")
            return " ".join(f"In {place} it is {rng.choice(WEATHER)}{end}" for _ in range(rng.choice((1, 3))))

        return self._distinct_pool(write)

    def featurize(self, question: str, text: str) -> list[float]:
        place = question.removeprefix("What is the weather like in ").rstrip("?")
        sentences = len(re.findall(r"[.!]", text))
        excited, calm = text.count("!"), text.count(".")
        return [
            float(place.lower() in text.lower()),
            float(0 < sentences <= 1),
            float(sentences >= 3),
            float(calm > excited),
            float(excited > calm),
        ]

    def sample_persona(self, rng: Any, decided: Any) -> Persona:
        traits = {"length": ("short", "long"), "tone": ("calm", "excited")}
        chosen = rng.sample(sorted(traits), rng.choice((1, 2)))
        return Persona({t: {"value": rng.choice(traits[t]), "weight": 1.0} for t in sorted(chosen)})

    def describe(self, traits: dict[str, dict[str, Any]]) -> str:
        return "This user likes " + " and ".join(f"{spec['value']} answers" for spec in traits.values()) + "."

    def split(self, traits: dict[str, dict[str, Any]]) -> str | None:
        return "train" if len(traits) == 1 else "test"


@pytest.fixture
def registered(monkeypatch):
    """The domain and the baseline, registered for this test only."""
    monkeypatch.setitem(sim_registry.DOMAINS, WeatherToy.name, WeatherToy)
    monkeypatch.setattr(systems, "SYSTEMS", systems.SYSTEMS)
    monkeypatch.setattr(systems, "TRAININGS", systems.TRAININGS)
    # A new baseline with a training of its own: FSPO trained with DPO instead of IPO, from the same SFT.
    register_training(Training("dpo", "fspo", start="sft", overrides={"loss": "dpo", "beta": 0.1}))
    register_system(System("fspo-dpo", "FSPO (DPO)", "dpo", versus=("fspo", "population-ipo")))


def test_a_domain_and_a_baseline_declared_outside_src_run_through_quickstart_and_paper(registered, tmp_path):
    profile = load_profile("tiny", domain=WeatherToy.name, seed=0)
    assert (profile.domain, profile.shots, profile.sim_options) == ("weather-toy", 2, {})
    qs = tmp_path / "paper" / "weather-toy-seed0"  # where `fspo paper` looks: it finds this run cached
    summary = run_quickstart(qs, profile)
    assert summary["winrates"]["fspo-dpo vs fspo"]["unseen"]["n"] > 0  # the baseline's comparisons
    assert "fspo-dpo vs base" in summary["winrates"]
    dpo = json.loads((qs / "dpo" / "fspo_config.json").read_text())
    assert (dpo["loss"], dpo["beta"]) == ("dpo", 0.1)  # its training ran with its overrides
    assert "FSPO (DPO)" in (qs / "report" / "report.md").read_text()

    # `fspo paper` on the new domain: no paper cells, so no paper table, but every other section.
    result = run_paper(tmp_path / "paper", [WeatherToy.name], [0], profile="tiny")
    agg = result["domains"][WeatherToy.name]
    assert agg["winrates"]["fspo vs population-ipo"]["unseen"]["n"] > 0
    paper_md = (tmp_path / "paper" / "report" / "paper.md").read_text()
    assert "## weather-toy" in paper_md and "The paper's table" not in paper_md
    assert "fspo-dpo vs fspo" in paper_md
