"""`fspo study init`: a blind study of a quickstart's FSPO against a baseline, on its unseen users.

It reads the quickstart's folders (sim/, episodes/, the stage markers) and the systems registry
(`fspo.eval.systems`) for the models to serve, so the server (`fspo.serve`) knows neither.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fspo.core.errors import UserError
from fspo.data.schema import User

console = Console()


def init_from_quickstart(
    quickstart: str | Path,
    out: str | Path,
    *,
    code: str | None = None,
    label_count: int | None = None,
    trials: int | None = None,
    seed: int = 0,
    baseline: str = "population-ipo",
) -> dict[str, Any]:
    """Write a study of the quickstart's unseen users into `out`: study.yaml, pairs.jsonl, questions.jsonl,
    users.jsonl. Returns what was written and the commands to serve and simulate it. FSPO is compared
    with `baseline`, a system of the registry (`fspo.eval.systems`) that answers with a trained model.

    The study is the offline evaluation's, moved online: the unseen users' test episodes the quickstart
    generated answers for (the first `eval_episodes` of ``test_unseen``) give the participants (their
    users), the held-out questions (their queries) and the bank (their shots). Each participant gets as
    many trials as those episodes per user, so the study has about as many votes as the offline win rate
    has pairs. A participant labels pairs of the shared bank, to some of which their user is indifferent
    (the simulator's minimal pairs differ in one trait, which not every user cares about) and which the
    simulated user leaves unlabelled. So `label_count` defaults to the fewest pairs with which 9 in 10
    participants label at least as many pairs as the episodes have shots (binomial in the share of
    decided (user, pair) combinations, measured with the users' exact rewards on the bank), and the
    serve command printed caps the shots at the episodes' number (``--shots``), as offline.
    """
    import secrets

    import yaml

    from fspo.core.files import atomic_write_jsonl, atomic_write_text
    from fspo.data.io import write_records

    root, out = Path(quickstart), Path(out)
    fspo_system, base_system = _served_system("fspo"), _served_system(baseline)
    q = _quickstart_study_inputs(root)
    if label_count is None:
        decided = _decided_share(q.participants, q.bank, seed)
        if decided == 0:
            raise UserError("the unseen users are indifferent to every pair of the bank: nothing to label")
        label_count = _labels_needed(q.shots, decided, len(q.bank))
    trials = trials or max(1, round(len(q.episodes) / len(q.participants)))
    study = {
        "code": code or secrets.token_urlsafe(6),
        "pairs": "pairs.jsonl",
        "label_count": label_count,
        "questions": "questions.jsonl",
        "trials_per_participant": min(trials, len(q.questions)),
        "fspo": fspo_system.name,
        "baseline": base_system.name,
        "seed": seed,
        **({"max_new_tokens": q.generated["max_new_tokens"]} if "max_new_tokens" in q.generated else {}),
    }
    write_records(out / "pairs.jsonl", q.bank)  # user_id: whose shot it was (the server ignores it)
    atomic_write_jsonl(out / "questions.jsonl", ({"question": x} for x in q.questions))
    write_records(out / "users.jsonl", q.participants)
    header = (
        f"# A blind study of FSPO vs {base_system.name} on the unseen users of the quickstart in {root}\n"
        "# (written by `fspo study init`; paths are relative to this file's folder).\n"
    )
    atomic_write_text(out / "study.yaml", header + yaml.safe_dump(study, sort_keys=False))
    models = [root / s.model / "model" for s in (fspo_system, base_system)]
    return {
        "study": study,
        "participants": len(q.participants),
        "pairs": len(q.bank),
        "questions": len(q.questions),
        "episodes": len(q.episodes),
        "shots": q.shots,
        **_study_commands(root, out, q.shots, base_system, models),
        "offline": (q.offline or {}).get(f"fspo vs {base_system.name}", {}).get("unseen"),
        "missing_models": [str(m) for m in models if not m.is_dir()],
    }


@dataclass
class _QuickstartStudy:
    """What a study takes from a quickstart folder: its unseen users' evaluated episodes and more."""

    episodes: list[Any]
    participants: list[User]
    bank: list[Any]
    questions: list[str]
    shots: int
    generated: dict[str, Any]  # the `generate` stage's settings
    offline: dict[str, Any] | None  # the report's win rates


def _served_system(name: str):
    """The registry's system `name`, which must answer with a model the quickstart trained."""
    from fspo.eval.systems import SYSTEMS

    trained = {s.name: s for s in SYSTEMS if s.model is not None and s.mode == "plain" and not s.curve}
    if name not in trained:
        raise UserError(f"--baseline: {name!r} is no trained system; choose one of {', '.join(trained)}")
    return trained[name]


def _quickstart_study_inputs(root: Path) -> _QuickstartStudy:
    from fspo.core.stages import StageRunner
    from fspo.data.episodes import load_episodes, load_meta
    from fspo.data.io import find_data_file, read_records

    runner = StageRunner(root, console=console)
    users = {u.user_id: u for u in read_records(find_data_file(root / "sim", "users"), User)}
    episodes = load_episodes(root / "episodes", "test_unseen")
    generated = (runner.marker("generate") or {}).get("params", {})
    if isinstance(generated.get("eval_episodes"), int):
        episodes = episodes[: generated["eval_episodes"]]  # the ones `fspo quickstart` evaluated
    if not episodes:
        raise UserError(f"{root / 'episodes'}: no test_unseen episodes: the quickstart has no unseen users")
    missing = sorted({e.user_id for e in episodes} - set(users))
    if missing:
        raise UserError(f"{root / 'sim'}: users.jsonl lacks the episodes' users {', '.join(missing[:5])}")
    return _QuickstartStudy(
        episodes=episodes,
        participants=[users[uid] for uid in dict.fromkeys(e.user_id for e in episodes)],
        bank=list({(p.question, p.chosen, p.rejected): p for e in episodes for p in e.shots}.values()),
        questions=list(dict.fromkeys(e.query.question for e in episodes)),
        shots=int(load_meta(root / "episodes").get("shots") or len(episodes[0].shots)),
        generated=generated,
        offline=(runner.marker("report") or {}).get("summary", {}).get("winrates"),
    )


def _study_commands(root: Path, out: Path, shots: int, baseline: Any, models: list[Path]) -> dict[str, str]:
    db = f"sqlite:///{out / 'study.db'}"
    base_shots = 0 if baseline.shots == 0 else shots
    serve = (
        f"fspo serve --model {models[0]} --shots {shots} "
        f"--baseline {baseline.name}={models[1]}:{base_shots} --study {out / 'study.yaml'} --db {db}"
    )
    sim = (
        f"fspo study simulate --url http://127.0.0.1:8000 --study {out / 'study.yaml'} "
        f"--users {out / 'users.jsonl'} --db {db}"
    )
    return {"serve": serve, "simulate": sim}


def _decided_share(users: Sequence[User], bank: Sequence[Any], seed: int, max_checks: int = 5000) -> float:
    """The share of (user, bank pair) combinations the user is not indifferent to, by the exact reward
    (over a seeded sample of at most `max_checks` combinations)."""
    from fspo.sim.reward import prefer

    combos = [(u, p) for u in users for p in bank]
    if len(combos) > max_checks:
        combos = random.Random(seed).sample(combos, max_checks)
    decided = sum(prefer(u, p.question, p.chosen, p.rejected) != 0.5 for u, p in combos)
    return decided / len(combos)


def _labels_needed(shots: int, decided: float, most: int, coverage: float = 0.9) -> int:
    """The fewest pairs n (at most `most`) for which P(Binomial(n, decided) >= shots) >= `coverage`."""
    from scipy import stats

    n = shots
    while n < most and stats.binom.sf(shots - 1, n, decided) < coverage:
        n += 1
    return min(n, most)


def init_cmd(
    from_quickstart: Path | None = typer.Option(None, help="A `fspo quickstart` output folder."),
    from_synth: Path | None = typer.Option(
        None,
        help="A `fspo synth` output folder: its answer pairs are the bank, held-out questions the trials.",
    ),
    out: Path = typer.Option(..., help="Folder for study.yaml, pairs.jsonl, questions.jsonl, users.jsonl."),
    code: str | None = typer.Option(None, help="The sign-in code (default: a random one)."),
    label_count: int | None = typer.Option(
        None, min=1, help="Pairs each participant labels (default: see docs)."
    ),
    trials: int | None = typer.Option(
        None, min=1, help="Trials per participant (default: episodes per user)."
    ),
    seed: int = typer.Option(0, help="The study's seed (pairs, questions and sides per participant)."),
    baseline: str = typer.Option(
        "population-ipo", help="The system FSPO is compared with (a trained system of fspo.eval.systems)."
    ),
    fspo_model: Path | None = typer.Option(None, help="--from-synth: the FSPO model folder to serve."),
    baseline_model: str | None = typer.Option(
        None, help="--from-synth: the baseline served beside it, NAME=DIR[:SHOTS] (as fspo serve --baseline)."
    ),
    heldout: float = typer.Option(0.2, help="--from-synth: the share of questions kept for the trials."),
) -> None:
    """A study of FSPO vs a baseline, and how to run it: on a quickstart's unseen users, or on a synth
    export's questions and answers for real people."""
    if (from_quickstart is None) == (from_synth is None):
        raise UserError("study init: give one of --from-quickstart and --from-synth")
    if from_synth is not None:
        _init_synth(from_synth, out, code, label_count, trials, seed, fspo_model, baseline_model, heldout)
        return
    assert from_quickstart is not None
    info = init_from_quickstart(
        from_quickstart, out, code=code, label_count=label_count, trials=trials, seed=seed, baseline=baseline
    )
    s = info["study"]
    console.print(
        f"wrote {out}/study.yaml, pairs.jsonl ({info['pairs']} pairs), "
        f"questions.jsonl ({info['questions']}), users.jsonl ({info['participants']} unseen users): "
        f"{s['label_count']} labels and "
        f"{s['trials_per_participant']} trials per participant (offline: {info['episodes']} episodes, "
        f"{info['shots']} shots each)"
    )
    for path in info["missing_models"]:
        console.print(f"[yellow]no model at {path}: finish the quickstart first[/]")
    console.print("serve it:")
    console.print(f"  {info['serve']}", highlight=False, markup=False, soft_wrap=True)
    console.print("then, in another shell, simulate its participants:")
    console.print(f"  {info['simulate']}", highlight=False, markup=False, soft_wrap=True)
    if info["offline"]:
        w = info["offline"]
        console.print(
            f"offline (fspo eval winrate, exact reward, unseen users): {w['win_rate']:.1%} "
            f"[{w['ci'][0]:.1%}, {w['ci'][1]:.1%}] n={w['n']}"
        )


def _init_synth(
    synth: Path,
    out: Path,
    code: str | None,
    label_count: int | None,
    trials: int | None,
    seed: int,
    fspo_model: Path | None,
    baseline_model: str | None,
    heldout: float,
) -> None:
    from fspo.quickstart.synth_study import init_from_synth

    if fspo_model is None or baseline_model is None:
        raise UserError(
            "study init --from-synth: name the models to serve with --fspo-model and --baseline-model"
        )
    info = init_from_synth(
        synth,
        out,
        code=code,
        label_count=label_count or 8,
        trials=trials or 5,
        seed=seed,
        heldout=heldout,
        fspo_model=fspo_model,
        baseline=baseline_model,
    )
    s = info["study"]
    console.print(
        f"wrote {out}/study.yaml, pairs.jsonl ({info['pairs']} answer pairs), questions.jsonl "
        f"({info['questions']} held-out questions): {s['label_count']} labels and "
        f"{s['trials_per_participant']} trials per participant"
    )
    console.print("serve it:")
    console.print(f"  {info['serve']}", highlight=False, markup=False, soft_wrap=True)
