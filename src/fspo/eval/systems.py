"""The systems the paper compares, declared once: every consumer reads this registry.

A *system* is a way of answering a user: a model (pretrained, or the output of one of the pipeline's
*trainings*), a generation mode and a number of shots. The quickstart trains the trainings and
generates every system's answers; the report labels and orders them; `fspo paper` lays them beside the
paper's cells; `fspo study init` finds the models to serve. Adding a baseline is one `System` here
(plus a `Training` when it needs a model of its own, and its training code when that is new).

This module is data only (it imports nothing of fspo), so every layer that reads it may.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Mode = Literal["plain", "rat", "oracle"]
CURVE = "{k}"  # stands for a number of shots in the names of the shots curve's systems


@dataclass(frozen=True)
class Training:
    """One training run of the pipeline: a `TrainConfig` stage (``sft`` or ``fspo``) started from the
    model of the training `start` (None: the pretrained model), with `overrides` on top of the
    profile's values for its stage. A `population` run sees no shots, with the budget of its few-shot
    counterpart (see `fspo.quickstart.pipeline`)."""

    name: str
    stage: Literal["sft", "fspo"]
    start: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    population: bool = False


@dataclass(frozen=True)
class System:
    """One system. `model` names the training whose model answers (None: the pretrained model);
    `shots` None answers with all of an episode's shots. `versus` are the opponents it is compared
    with head to head (every system is also compared with ``base``), `verdicts` those of them whose
    outcome the report states in words. `accuracy_reference` (a training) makes the quickstart
    measure this system's implicit-reward accuracy against that reference. `paper` holds the paper's
    win rates against the base model, ``{domain: {split: percent}}``. A `curve` system is repeated for
    every extra number of shots of the profile (``also_shots``), ``{k}`` in its names standing for it."""

    name: str
    label: str
    model: str | None
    mode: Mode = "plain"
    shots: int | None = None
    versus: tuple[str, ...] = ()
    verdicts: tuple[str, ...] = ()
    accuracy_reference: str | None = None
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    curve: bool = False


def _cells(**per_domain: float | tuple[float, float]) -> dict[str, dict[str, float]]:
    """A system's paper cells: one number is the unseen users' cell (Roleplay's one column), a pair is
    (seen, unseen)."""
    return {
        domain: {"unseen": v} if isinstance(v, float) else {"seen": v[0], "unseen": v[1]}
        for domain, v in per_domain.items()
    }


# The pipeline's trainings: SFT → FSPO, SFT → RAT SFT → FSPO with RAT, and the zero-shot population
# pair with FSPO's budget. `fspo_rat_pairs` (RAT's description pairs) runs when the profile asks for
# description pairs; it trains on the pairs `fspo.train.rat_pairs` samples from `fspo_rat`.
TRAININGS: tuple[Training, ...] = (
    Training("sft", "sft"),
    Training("fspo", "fspo", start="sft"),
    Training("sft_rat", "sft", start="sft", overrides={"rat": "target"}),
    Training("fspo_rat", "fspo", start="sft_rat", overrides={"rat": "target"}),
    Training("pop_sft", "sft", population=True),
    Training("pop_ipo", "fspo", start="pop_sft", population=True),
    Training("fspo_rat_pairs", "fspo", start="fspo_rat", overrides={"rat": "description"}),
)
RAT_PAIRS_TRAINING = "fspo_rat_pairs"
# On-policy FSPO (`fspo.train.onpolicy`): rounds of sampling the FSPO model's own answers for training
# users, labelling them with the simulator's reward and training IPO on them. It is a stage of its own
# (not one `TrainConfig` run), run when the profile asks for rounds; its model answers `fspo-onpolicy`.
ONPOLICY = "onpolicy"

# In the paper's table order (the order reports list systems in).
SYSTEMS: tuple[System, ...] = (
    System("base", "Base model (zero-shot)", None, shots=0),
    System(
        "population-ipo",
        "Population IPO (zero-shot)",
        "pop_ipo",
        shots=0,
        accuracy_reference="pop_sft",
        paper=_cells(roleplay=72.4),
    ),
    System(
        "few-shot-prompting",
        "Few-shot prompting",
        None,
        paper=_cells(roleplay=63.2, elix=(92.4, 81.4), reviews=(69.1, 59.1)),
    ),
    System(
        "few-shot-pref-ft",
        "Few-shot Pref-FT (SFT)",
        "sft",
        paper=_cells(roleplay=62.8, elix=(91.2, 82.9), reviews=(65.6, 70.7)),
    ),
    System(
        "fspo",
        "FSPO",
        "fspo",
        # fspo-{k}-shots: all the shots against fewer, one pair per extra number of shots.
        versus=(
            "population-ipo",
            "few-shot-prompting",
            "few-shot-pref-ft",
            "fspo-no-shots",
            "fspo-{k}-shots",
        ),
        # FSPO beating its no-shot control is personalization; beating the baselines but not the
        # control is only a better general model.
        verdicts=("fspo-no-shots", "population-ipo", "few-shot-pref-ft"),
        accuracy_reference="sft",
        paper=_cells(roleplay=82.6, elix=(97.8, 91.8), reviews=(80.4, 73.6)),
    ),
    System(
        "fspo-rat",
        "FSPO + RAT",
        "fspo_rat",
        mode="rat",
        # Against the population as well: the share of the oracle's win rate RAT recovers.
        versus=("fspo", "population-ipo"),
        verdicts=("fspo",),
        accuracy_reference="sft_rat",
        paper=_cells(roleplay=90.3),
    ),
    System(
        "oracle",
        "Oracle description",
        "fspo_rat",
        mode="oracle",
        # Against FSPO without shots: a description stated in the prompt is used.
        versus=("fspo", "fspo-rat", "population-ipo", "fspo-no-shots"),
        verdicts=("fspo-rat", "fspo-no-shots"),
        paper=_cells(roleplay=90.9),
    ),
    System(
        "fspo-onpolicy",
        "FSPO, on-policy rounds",
        ONPOLICY,
        versus=("fspo", "population-ipo", "few-shot-prompting"),
        verdicts=("fspo",),
        accuracy_reference="sft",
    ),
    # The control: the FSPO model without the user's shots.
    System("fspo-no-shots", "FSPO without shots", "fspo", shots=0),
    # The shots curve: FSPO and FSPO+RAT answering with the first k shots (the paper's Reviews table
    # at 4 and 8 shots), against the population, and RAT against FSPO at each k.
    System(
        "fspo-{k}-shots",
        "FSPO, {k} shots",
        "fspo",
        versus=("population-ipo",),
        curve=True,
        paper=_cells(reviews=(78.4, 71.3)),
    ),
    System(
        "fspo-rat-{k}-shots",
        "FSPO + RAT, {k} shots",
        "fspo_rat",
        mode="rat",
        versus=("population-ipo", "fspo-{k}-shots"),
        curve=True,
    ),
)
# The paper's cells of the shots curve are at 4 shots (its Reviews table: 4 and 8).
PAPER_CURVE_SHOTS = 4

# What the paper calls each split of a domain, where it differs from ours: ELIX's "easy" users have
# whole levels as in training (our seen users), its "hard" ones sit in between (our unseen); Reviews'
# "trained" / "interpolated" users are our seen / unseen; Roleplay's one column is its held-out users.
PAPER_SPLITS: dict[str, dict[str, str]] = {
    "roleplay": {"unseen": "held-out users"},
    "elix": {"seen": "easy (seen levels)", "unseen": "hard (between levels)"},
    "reviews": {"seen": "trained user types", "unseen": "interpolated types"},
}


def register_system(system: System) -> System:
    """Add `system` to the registry (after the built-in ones): the quickstart generates its answers and
    compares it as it declares, the report and `fspo paper` list it, the study can serve it."""
    global SYSTEMS
    if any(s.name == system.name for s in SYSTEMS):
        raise ValueError(f"a system named {system.name!r} is registered already")
    SYSTEMS = (*SYSTEMS, system)
    return system


def register_training(t: Training) -> Training:
    """Add a training run to the pipeline (after the built-in ones; its `start` must be one of them)."""
    global TRAININGS
    if any(x.name == t.name for x in TRAININGS):
        raise ValueError(f"a training named {t.name!r} is registered already")
    if t.start is not None and all(x.name != t.start for x in TRAININGS):
        raise ValueError(f"training {t.name!r} starts from {t.start!r}, which is no registered training")
    TRAININGS = (*TRAININGS, t)
    return t


def training(name: str) -> Training:
    for t in TRAININGS:
        if t.name == name:
            return t
    raise KeyError(f"no training {name!r} in fspo.eval.systems.TRAININGS")


def expand(
    also_shots: tuple[int, ...] | list[int] = (), systems: tuple[System, ...] | None = None
) -> tuple[System, ...]:
    """Every system of a run: `systems` with each curve system once per number in `also_shots` (after
    the fixed ones, in the order of `also_shots`), and ``{k}`` in an opponent's name expanded alike.
    `systems` defaults to the registry as it stands (with what `register_system` added)."""
    systems = SYSTEMS if systems is None else systems
    fixed = tuple(replace(s, versus=_each_k(s.versus, also_shots)) for s in systems if not s.curve)
    curved = tuple(_at(s, k) for k in also_shots for s in systems if s.curve)
    return fixed + curved


def _each_k(names: tuple[str, ...], also_shots: tuple[int, ...] | list[int]) -> tuple[str, ...]:
    return tuple(
        x for n in names for x in ([n.replace(CURVE, str(k)) for k in also_shots] if CURVE in n else [n])
    )


def _at(system: System, k: int) -> System:
    def sub(text: str) -> str:
        return text.replace(CURVE, str(k))

    return replace(
        system,
        name=sub(system.name),
        label=sub(system.label),
        shots=k,
        versus=tuple(sub(v) for v in system.versus),
        verdicts=tuple(sub(v) for v in system.verdicts),
        paper=system.paper if k == PAPER_CURVE_SHOTS else {},
        curve=False,
    )


def comparisons(systems: tuple[System, ...]) -> list[tuple[str, str]]:
    """The (system, opponent) pairs a run's report measures: every system against the base model,
    then each system's head-to-head opponents. Pairs with a system the run lacks are left out."""
    names = {s.name for s in systems}
    pairs = [(s.name, "base") for s in systems if s.name != "base" and "base" in names]
    return pairs + [(s.name, o) for s in systems for o in s.versus if o in names]


def verdict_pairs(systems: tuple[System, ...]) -> list[tuple[str, str]]:
    names = {s.name for s in systems}
    return [(s.name, o) for s in systems for o in s.verdicts if o in names]


def labels(systems: tuple[System, ...] | None = None) -> dict[str, str]:
    """Display names, in the registry's order (the order tables list systems in)."""
    systems = SYSTEMS if systems is None else systems
    return {s.name: s.label for s in systems if not s.curve}


def paper_cells(systems: tuple[System, ...]) -> dict[str, dict[str, dict[str, float]]]:
    """The paper's cells of `systems` as ``{domain: {split: {system: percent}}}``."""
    cells: dict[str, dict[str, dict[str, float]]] = {}
    for s in systems:
        for domain, per in s.paper.items():
            for split, value in per.items():
                cells.setdefault(domain, {}).setdefault(split, {})[s.name] = value
    return cells
