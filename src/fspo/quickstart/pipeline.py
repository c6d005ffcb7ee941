"""`fspo quickstart`: the whole FSPO pipeline on the embedded default model, in one command.

simulate users → episodes → tokenizer + model + LM pretraining → the registry's trainings
(`fspo.eval.systems.TRAININGS`: few-shot Pref-FT (SFT) → FSPO (IPO), the same with RAT, the zero-shot
population pair) → personalized generation for every system of the registry → win rates judged by each
simulated user's exact reward → accuracy vs shots → report (`fspo.quickstart.report`).

Every stage is cached under `out/<stage>/` (see `fspo.core.stages`), so a second run only redoes what
changed: settings, or a stage's files, which its marker holds the sha256 of (a damaged output re-runs
its stage, and the stages that read it when the re-run wrote other bytes). After a kill, training
stages resume from their checkpoints and generation from its append log. The numbers printed at the
end are the ones written to `out/report/results.json`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from fspo.core.outputs import OutputFolder
from fspo.core.stages import StageRunner
from fspo.eval import systems as registry
from fspo.eval.systems import ONPOLICY, RAT_PAIRS_TRAINING, System, expand
from fspo.quickstart.profile import Profile, load_profile
from fspo.quickstart.report import acc_at, print_table, report
from fspo.quickstart.trainings import CONTEXTS, cache_key, shares_contexts, training_configs, trainings_of
from fspo.train.config import TrainConfig


def rat_stage(p: Profile) -> str:
    """The stage of the final RAT model: after the description pairs when `p` trains on them."""
    return RAT_PAIRS_TRAINING if p.rat_pairs_samples else "fspo_rat"


def generated_systems(p: Profile) -> tuple[System, ...]:
    """The registry's systems for `p`: the shots curve at `p.also_shots`, RAT's answers from `rat_stage`,
    and only systems whose model `p` trains."""
    rat = rat_stage(p)
    models = {None, *trained_stages(p)}
    systems = (s if s.model != "fspo_rat" else replace(s, model=rat) for s in expand(p.also_shots))
    return tuple(s for s in systems if s.model in models)


def trained_stages(p: Profile) -> tuple[str, ...]:
    """The stages of `p` that leave a model: its trainings, and on-policy FSPO when it asks for rounds."""
    return tuple(t.name for t in trainings_of(p)) + ((ONPOLICY,) if p.onpolicy else ())


def stages() -> tuple[str, ...]:
    """The stage folders the quickstart writes under its `out` (its output policy's own files)."""
    trainings = tuple(t.name for t in registry.TRAININGS)
    return (
        "sim",
        "episodes",
        CONTEXTS,
        "model",
        *trainings,
        "rat_pairs",
        ONPOLICY,
        "generate",
        "accuracy",
        "report",
    )


def run_quickstart(
    out: str | Path = "runs/quickstart",
    profile: str | Profile = "default",
    force: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) every stage of `profile` (a name or a `load_profile` result) into `out`. An
    `out` holding a run of another profile is refused unless `overwrite` (or `force`, which redoes
    every stage); then the stage cache redoes exactly the stages whose settings changed."""
    p = load_profile(profile) if isinstance(profile, str) else profile
    console = Console()
    runner = StageRunner(Path(out), force=force, console=console)
    params = p.model_dump(mode="json")
    output = OutputFolder(
        out, "quickstart", params, stages(), overwrite=overwrite or force, resumable=True, cached_stages=True
    )
    with output.writing():
        summary = _run_stages(p, runner, params)
    print_table(console, summary, runner.timings)
    return summary


def _run_stages(p: Profile, runner: StageRunner, params: dict[str, Any]) -> dict[str, Any]:
    runner.run("sim", _pick(params, "domain users prefs_per_user seed sim_options"), lambda d: _sim(p, d))
    runner.run("episodes", _pick(params, "shots seed"), lambda d: _episodes(p, runner, d), ("sim",))
    if p.questions_per_context > 1:
        key = _pick(params, "shots seed questions_per_context")
        runner.run(CONTEXTS, key, lambda d: _contexts(p, runner, d), ("sim",))
    runner.run("model", _pick(params, MODEL_FIELDS), lambda d: _model(p, runner, d), ("sim",))
    model_dir = str(runner.folder("model") / "model")
    configs = training_configs(p, model_dir, runner.folder("episodes"), runner.root)
    for t in trainings_of(p):
        cfg = configs[t.name]
        upstream = ((t.start,) if t.start else ()) + ((CONTEXTS,) if shares_contexts(p, t) else ())
        if t.name == RAT_PAIRS_TRAINING:
            # RAT's description pairs (v2): sample descriptions from the RAT model, pair best and
            # worst, and train FSPO+RAT on them from where it stands.
            key = {"rat_pairs_samples": p.rat_pairs_samples, **_pick(params, "seed domain"), **cache_key(cfg)}
            runner.run(
                "rat_pairs", key, lambda d, cfg=cfg: _rat_pairs(p, cfg, runner, d), ("episodes", t.start)
            )
            upstream += ("rat_pairs",)
        runner.run(
            t.name,
            cache_key(cfg),
            lambda d, cfg=cfg, pairs=t.name == RAT_PAIRS_TRAINING: (_train_on_pairs if pairs else _train)(
                cfg, runner
            ),
            ("episodes", "model", *upstream),
        )
    if p.onpolicy:
        cfg = _onpolicy_config(p, configs["fspo"], runner)
        key = _onpolicy_key(cfg)
        runner.run(ONPOLICY, key, lambda d: _onpolicy(cfg, runner), ("sim", "episodes", "fspo"))
    trained = trained_stages(p)
    systems = generated_systems(p)
    runner.run(
        "generate",
        {
            **_pick(params, "eval_episodes max_new_tokens seed include_dispreferred decoding best_of"),
            "systems": [(s.name, s.model, s.mode, s.shots) for s in systems],
        },
        lambda d: _generate(p, runner, d, model_dir),
        ("episodes", "model", *trained),
    )
    beta = configs["fspo"].beta
    runner.run(
        "accuracy",
        {**_pick(params, "accuracy_shots eval_episodes"), "beta": beta},
        lambda d: _accuracy(p, runner, d, beta),
        ("episodes", *trained),
    )
    return runner.run(
        "report",
        {"systems": [s.name for s in systems], "best_of_curve": list(p.best_of_curve)},
        lambda d: report(p, systems, runner, d, test_episodes(p, runner)),
        ("sim", "generate", "accuracy"),
    )


MODEL_FIELDS = (
    "model_size corpus_docs corpus_consistent corpus_consistent_answers corpus_described corpus_styled "
    "corpus_styled_answers corpus_styled_layout template_docs pretrain_steps seed"
)


def _pick(params: dict[str, Any], names: str) -> dict[str, Any]:
    return {k: params[k] for k in names.split()}


def _sim(p: Profile, folder: Path) -> dict[str, Any]:
    from fspo.sim import simulate, write_sim
    from fspo.sim.cli import print_stats

    data = simulate(p.domain, n_users=p.users, prefs_per_user=p.prefs_per_user, seed=p.seed, **p.sim_options)
    meta = write_sim(folder, data)
    print_stats(meta["stats"], data.info)  # the dataset the demo made: diversity and disagreement
    return {"users": len(data.users), "preferences": len(data.preferences)}


def _episodes(p: Profile, runner: StageRunner, folder: Path) -> dict[str, Any]:
    from fspo.data.episodes import build_episodes, write_episodes
    from fspo.data.io import read_dataset_dir

    prefs, users, _ = read_dataset_dir(runner.folder("sim"))
    splits = build_episodes(prefs, users, shots=p.shots, seed=p.seed)
    for line in splits.report.lines(p.shots):
        runner.console.print(f"  {line}")
    write_episodes(folder, splits, meta={"shots": p.shots, "seed": p.seed, "source": "sim"})
    counts = splits.counts()
    runner.console.print("  episodes: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return counts


def _contexts(p: Profile, runner: StageRunner, folder: Path) -> dict[str, Any]:
    """The few-shot FSPO trainings' episodes (`fspo.quickstart.trainings.shares_contexts`): the training
    users' preferences cut into blocks of `shots` + K, K queries sharing one shot set. A stage of its own
    beside `episodes`, whose one-query test splits (and SFT's file) stay as they are whatever K is."""
    from fspo.data.episodes import build_episodes
    from fspo.data.io import read_dataset_dir, write_records

    prefs, users, _ = read_dataset_dir(runner.folder("sim"))
    k = p.questions_per_context
    splits = build_episodes(prefs, users, shots=p.shots, seed=p.seed, questions_per_context=k)
    n = write_records(folder / "train.jsonl", splits["train"])
    runner.console.print(f"  {n} training episodes, {k} per shot set")
    return {"train": n}


def _model(p: Profile, runner: StageRunner, folder: Path) -> dict[str, Any]:
    from fspo.models.default import init_model
    from fspo.models.pretrain import pretrain

    texts = pretraining_texts(p, runner.folder("sim"))
    model_dir = init_model(folder / "model", texts, size=p.model_size, seed=p.seed)
    return pretrain(model_dir, texts, steps=p.pretrain_steps, seed=p.seed)


def pretraining_texts(p: Profile, sim_folder: Path) -> list[str]:
    """The `model` stage's corpus: domain text by `p`'s corpus options, plus `p.template_docs`
    FSPO-layout documents of the preferences in `sim_folder` (read only when any are asked for)."""
    from fspo.data.io import read_dataset_dir
    from fspo.models.pretrain import template_documents
    from fspo.sim import corpus

    texts = corpus(
        p.domain,
        seed=p.seed,
        n=p.corpus_docs,
        consistent=p.corpus_consistent,
        consistent_answers=p.corpus_consistent_answers,
        described=p.corpus_described,
        styled=p.corpus_styled,
        styled_answers=p.corpus_styled_answers,
        styled_layout=p.corpus_styled_layout,
    )
    if p.template_docs:
        prefs, _, _ = read_dataset_dir(sim_folder)
        extra = template_documents(prefs, shots=p.shots, seed=p.seed)  # shuffled: a prefix is a random subset
        texts += extra if p.template_docs < 0 else extra[: p.template_docs]
    return texts


def _train(cfg: TrainConfig, runner: StageRunner) -> dict[str, Any]:
    from fspo.train.trainer import train

    resume = (Path(cfg.out) / "checkpoints").exists()
    result = train(cfg, resume=resume)
    return {"steps": result.steps, **{k: round(v, 4) for k, v in result.eval_metrics.items()}}


def _rat_pairs(p: Profile, cfg: TrainConfig, runner: StageRunner, folder: Path) -> dict[str, Any]:
    """Description pairs sampled from FSPO+RAT on the first training episodes (`build_rat_pairs`)."""
    from fspo.data.episodes import load_episodes
    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer
    from fspo.train.rat_pairs import build_rat_pairs, description_scorer

    path = Path(cfg.model)
    # Twice the episodes the pair training reads: spare for episodes whose candidates all tie
    # (every sample right), which give no pair.
    n = (cfg.max_steps or 1) * cfg.batch_size * 2
    stats = build_rat_pairs(
        load_model(path),
        load_tokenizer(path),
        load_episodes(runner.folder("episodes"), "train", limit=n),
        folder,
        scorer=description_scorer(f"traits:{p.domain}"),
        samples=p.rat_pairs_samples,
        batch_size=p.gen_batch_size // p.rat_pairs_samples or 1,
        seed=p.seed,
        options=trained_layout(path),
        progress=True,
    )
    runner.console.print(
        f"  description pairs: {stats['pairs']} of {stats['episodes']} episodes "
        f"(mean sample score {stats['mean_score']:.2f}, "
        f"all-right samples {100 * stats['perfect_share']:.0f}%)"
    )
    return stats


def _train_on_pairs(cfg: TrainConfig, runner: StageRunner) -> dict[str, Any]:
    """FSPO+RAT on the description pairs; with fewer pairs than one batch (every sample already
    right, or none differ) there is nothing to learn, and the stage keeps the model it starts from."""
    import shutil

    pairs = json.loads((Path(cfg.episodes).parent / "rat_pairs.json").read_text())["pairs"]
    if pairs < cfg.batch_size:
        runner.console.print(f"  {pairs} description pairs, fewer than a batch: FSPO+RAT is kept as it is")
        shutil.copytree(cfg.model, Path(cfg.out) / "model")
        return {"steps": 0, "pairs": pairs}
    return _train(cfg, runner)


def _onpolicy_config(p: Profile, fspo: TrainConfig, runner: StageRunner) -> Any:
    """On-policy FSPO from the FSPO model, labelled by the simulator: each round's IPO run takes the
    FSPO runs' settings (but their step budget) under the profile's own `onpolicy.train`."""
    from fspo.train.onpolicy import onpolicy_config

    fspo_values = {k: v for k, v in {**p.train, **p.fspo}.items() if k not in ("max_steps", "save_every")}
    values = {
        "seed": p.seed,
        **p.onpolicy,
        "train": {**fspo_values, **p.onpolicy.get("train", {})},
        "model": fspo.out + "/model",
        "episodes": str(runner.folder("episodes")),
        "users": str(runner.folder("sim")),
        "out": str(runner.folder(ONPOLICY)),
        "judge": "exact",
    }
    return onpolicy_config(values, source="profile field 'onpolicy'")


def _onpolicy_key(cfg: Any) -> dict[str, Any]:
    """An on-policy stage's cache key: its settings but the paths."""
    return cfg.model_dump(mode="json", exclude={"model", "episodes", "users", "out"})


def _onpolicy(cfg: Any, runner: StageRunner) -> dict[str, Any]:
    from fspo.train.onpolicy import run_onpolicy

    summary = run_onpolicy(cfg, progress=True)  # a killed stage resumes its rounds
    for r in summary["rounds"]:
        runner.console.print(f"  on-policy round {r.get('round')}: " + ", ".join(
            f"{k} {v}" for k, v in r.items() if isinstance(v, int | float) and k != "round"
        ))  # fmt: skip
    return {"rounds": len(summary["rounds"])}


def test_episodes(p: Profile, runner: StageRunner) -> list:
    """The evaluated episodes: the first `p.eval_episodes` of each test split, unseen users first."""
    from fspo.data.episodes import load_episodes

    episodes = []
    for split in ("test_unseen", "test_seen"):
        episodes += load_episodes(runner.folder("episodes"), split)[: p.eval_episodes]
    return episodes


def _model_path(runner: StageRunner, model_dir: str, stage: str | None) -> str:
    return model_dir if stage is None else str(runner.folder(stage) / "model")


def _generate(p: Profile, runner: StageRunner, folder: Path, model_dir: str) -> dict[str, Any]:
    from fspo.data.template import TemplateOptions
    from fspo.eval import generate_for_episodes
    from fspo.models.loading import load_model, load_tokenizer

    episodes = test_episodes(p, runner)
    decoding = p.generation_decoding()
    runner.console.print(
        f"  decoding: {decoding.describe()}" + (f", best of {p.best_of}" if p.best_of > 1 else "")
    )
    counts = {}
    loaded: dict[str, tuple[Any, Any]] = {}  # several systems share a model (base, fspo, fspo_rat)
    for system in generated_systems(p):
        path = _model_path(runner, model_dir, system.model)
        if path not in loaded:
            loaded[path] = (load_model(path), load_tokenizer(path))
        model, tokenizer = loaded[path]
        best_of = p.best_of if system.mode != "rat" else 1  # RAT's answers follow its own description
        runner.console.print(f"  generating: {system.name} ({len(episodes)} episodes, mode {system.mode})")
        records = generate_for_episodes(
            model,
            tokenizer,
            episodes,
            mode=system.mode,
            shots=system.shots,
            system=system.name,
            max_new_tokens=p.max_new_tokens,
            decoding=decoding,
            best_of=best_of,
            reference=_reference(path, loaded) if best_of > 1 else None,
            batch_size=p.gen_batch_size,
            options=TemplateOptions(include_dispreferred=p.include_dispreferred),
            out=folder / f"{system.name}.jsonl",
            progress=True,
        )
        counts[system.name] = len(records)
    return counts


def _reference(path: str, loaded: dict[str, tuple[Any, Any]]) -> Any:
    """Best-of-N's reference for the model in `path`: the model its training started from (with that
    training's β), or the model itself without shots when it was not trained (`fspo.infer.best_of`)."""
    from fspo.infer.best_of import SELF, Reference, training_reference
    from fspo.models.loading import load_model, load_tokenizer

    ref, beta = training_reference(path)
    if ref is None:
        return Reference(None, SELF)
    if ref not in loaded:
        loaded[ref] = (load_model(ref), load_tokenizer(ref))
    return Reference(loaded[ref][0], Path(ref).parent.name, beta)


def _accuracy(p: Profile, runner: StageRunner, folder: Path, beta: float) -> dict[str, Any]:
    from fspo.core.files import atomic_write_json
    from fspo.eval import accuracy_curve
    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer

    episodes = test_episodes(p, runner)  # accuracy_curve groups them by split
    curves = {}
    for system in generated_systems(p):
        if system.accuracy_reference is None:
            continue
        path = runner.folder(system.model) / "model"
        curves[system.name] = accuracy_curve(
            load_model(path),
            load_tokenizer(path),
            episodes,
            shots=p.accuracy_shots,
            ref_model=load_model(runner.folder(system.accuracy_reference) / "model"),
            beta=beta,
            options=trained_layout(path),  # as each was trained: shots' layout, RAT's description
            model_name=system.name,
            log=folder / f"accuracy.{system.name}.partial",  # a killed run resumes from its scored batches
        )
    atomic_write_json(folder / "accuracy.json", curves)
    for log in folder.glob("accuracy.*.partial"):
        log.unlink()
    return {label: acc_at(c, p.shots) for label, c in curves.items()}
