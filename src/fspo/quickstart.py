"""`fspo quickstart`: the whole FSPO pipeline on the embedded default model, in one command.

simulate users → episodes → tokenizer + model + LM pretraining → few-shot Pref-FT (SFT) → FSPO (IPO),
the same with RAT, and the zero-shot population baseline → personalized generation for every system
of the paper → win rates judged by each simulated user's exact reward → accuracy vs shots → report.

Every stage is cached under `out/<stage>/` (see `fspo.core.stages`), so a second run only redoes what
changed: settings, or a stage's files, which its marker holds the sha256 of (a damaged output re-runs
its stage, and the stages that read it when the re-run wrote other bytes). After a kill, training
stages resume from their checkpoints and generation from its append log. The numbers printed at the
end are the ones written to `out/report/results.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console
from rich.table import Table

from fspo.core.errors import UserError
from fspo.core.outputs import OutputFolder
from fspo.core.stages import StageRunner
from fspo.sim.corpus import StyledLayout


class Profile(BaseModel):
    """Sizes and budgets of one quickstart run: the schema of ``fspo/configs/quickstart/*.yaml``.

    The values, and why each is what it is, live in those files (`load_profile`) and are not
    repeated here: every field is required, ``default.yaml`` names them all, other profiles override some.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    users: int
    prefs_per_user: int
    sim_options: dict[str, Any]
    shots: int
    include_dispreferred: bool
    also_shots: tuple[int, ...]
    seed: int
    model_size: str
    corpus_docs: int
    corpus_consistent: float
    corpus_consistent_answers: int
    corpus_described: float
    corpus_styled: float
    corpus_styled_answers: int
    corpus_styled_layout: StyledLayout
    template_docs: int
    pretrain_steps: int
    sft_steps: int
    sft_shot_loss: bool
    rat_sft_steps: int
    rat_sft_lr: float
    rat_pairs_samples: int
    rat_pairs_steps: int
    fspo_steps: int
    fspo_nll_weight: float
    sft_lr: float
    fspo_lr: float
    beta: float
    batch_size: int
    max_tokens: int
    eval_episodes: int
    accuracy_shots: tuple[int, ...]
    max_new_tokens: int
    gen_batch_size: int


DOMAINS = ("roleplay", "reviews", "elix")


def load_profile(
    name: str = "default",
    domain: str | None = None,
    config: str | Path | None = None,
    seed: int | None = None,
    shots: int | None = None,
) -> Profile:
    """A run's profile, each layer overriding the fields it names: ``quickstart/default.yaml``, the
    domain's population (``quickstart/domains/<domain>.yaml``), the size profile `name` (e.g. tiny),
    a `config` file of the user's (YAML/JSON; a key that is no profile field is an error naming it),
    then `seed` and `shots`. More shots than the accuracy curve reaches extend it to `shots`."""
    from fspo.core.files import read_fields
    from fspo.train.config import named_config

    values = named_config("quickstart", "default")
    if domain is not None:
        if domain not in DOMAINS:
            raise UserError(f"--domain: unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
        values |= named_config("quickstart/domains", domain)
    if name != "default":
        values |= named_config("quickstart", name)
    if config is not None:
        given = read_fields(config)
        unknown = sorted(set(given) - set(Profile.model_fields))
        if unknown:
            raise UserError(
                f"config file {str(config)!r}: unknown profile field(s) {', '.join(unknown)} "
                "(the fields are those of fspo/configs/quickstart/default.yaml)"
            )
        values |= given
    if seed is not None:
        values["seed"] = seed
    if shots is not None:
        values["shots"] = shots
        values["accuracy_shots"] = sorted({k for k in values["accuracy_shots"] if k <= shots} | {shots})
    too_many = [k for k in values["also_shots"] if k >= values["shots"]]
    if too_many and config is not None and "also_shots" in given:
        raise UserError(
            f"config file {str(config)!r}: also_shots {too_many} must be below shots ({values['shots']})"
        )
    # A built-in layer's extra shot counts that a smaller `shots` leaves no room for are dropped:
    # FSPO with as many shots as the episode holds is `fspo` itself.
    values["also_shots"] = [k for k in values["also_shots"] if k < values["shots"]]
    try:
        return Profile.model_validate(values)
    except ValidationError as err:
        where = f"config file {str(config)!r}" if config is not None else f"quickstart profile {name!r}"
        raise UserError(f"{where}: {err}") from None


def default_out(domain: str | None, seed: int | None, shots: int | None, config: str | Path | None) -> str:
    """``runs/quickstart``, named after what was chosen: ``runs/quickstart-reviews-seed1``."""
    parts = ["quickstart"]
    parts += [domain] if domain else []
    parts += [f"seed{seed}"] if seed is not None else []
    parts += [f"{shots}shots"] if shots is not None else []
    parts += [Path(config).stem] if config is not None else []
    return str(Path("runs") / "-".join(parts))


# The systems the quickstart generates answers with, as the paper compares them: (name, trained model
# stage or None for the pretrained base, generation mode, number of shots (None = all of the
# episode's shots)).
GENERATED_SYSTEMS: tuple[tuple[str, str | None, str, int | None], ...] = (
    ("base", None, "plain", 0),
    ("few-shot-prompting", None, "plain", None),
    ("population-ipo", "pop_ipo", "plain", 0),
    ("few-shot-pref-ft", "sft", "plain", None),
    ("fspo", "fspo", "plain", None),
    ("fspo-rat", "fspo_rat", "rat", None),
    ("oracle", "fspo_rat", "oracle", None),
    # Control: the FSPO model without the user's shots. FSPO beating it is personalization; FSPO
    # beating the baselines but not this control is only a better general model.
    ("fspo-no-shots", "fspo", "plain", 0),
)


def rat_stage(p: Profile) -> str:
    """The stage of the final RAT model: after the description pairs when `p` trains on them."""
    return "fspo_rat_pairs" if p.rat_pairs_steps else "fspo_rat"


def generated_systems(p: Profile) -> tuple[tuple[str, str | None, str, int | None], ...]:
    """`GENERATED_SYSTEMS` (RAT's from `rat_stage`), plus FSPO and FSPO+RAT answering with fewer
    shots, one system each per `p.also_shots` (the shots curve of both)."""
    rat = rat_stage(p)
    systems = tuple(
        (name, rat if stage == "fspo_rat" else stage, mode, k) for name, stage, mode, k in GENERATED_SYSTEMS
    )
    for k in p.also_shots:
        systems += ((f"fspo-{k}-shots", "fspo", "plain", k), (f"fspo-rat-{k}-shots", rat, "rat", k))
    return systems


# The stage folders the quickstart writes under its `out` (its output policy's own files).
STAGES = ("sim", "episodes", "model", "sft", "fspo", "sft_rat", "fspo_rat", "rat_pairs", "fspo_rat_pairs",
          "pop_sft", "pop_ipo", "generate", "accuracy", "report")  # fmt: skip


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
        out, "quickstart", params, STAGES, overwrite=overwrite or force, resumable=True, cached_stages=True
    )
    with output.writing():
        summary = _run_stages(p, runner, params)
    _print_table(console, summary, runner.timings)
    return summary


def _run_stages(p: Profile, runner: StageRunner, params: dict[str, Any]) -> dict[str, Any]:

    runner.run("sim", _pick(params, "domain users prefs_per_user seed sim_options"), lambda d: _sim(p, d))
    runner.run("episodes", _pick(params, "shots seed"), lambda d: _episodes(p, runner, d), ("sim",))
    runner.run(
        "model",
        _pick(
            params,
            "model_size corpus_docs corpus_consistent corpus_consistent_answers corpus_described "
            "corpus_styled corpus_styled_answers corpus_styled_layout template_docs pretrain_steps seed",
        ),
        lambda d: _model(p, runner, d),
        ("sim",),
    )
    model_dir = str(runner.folder("model") / "model")
    trainings = _trainings(p, model_dir)
    for name, (cfg, upstream) in trainings.items():
        start = upstream and str(runner.folder(upstream) / "model")
        runner.run(
            name,
            {k: v for k, v in cfg.items() if k not in ("model", "out", "episodes", "eval_episodes")},
            lambda d, cfg=cfg, start=start: _train(cfg, runner, d, start or model_dir),
            ("episodes", "model") + ((upstream,) if upstream else ()),
        )
    trained = tuple(trainings)
    if p.rat_pairs_steps:
        # RAT's description pairs (v2): sample descriptions from the RAT model, pair best and worst,
        # and train FSPO+RAT on them from where it stands.
        runner.run(
            "rat_pairs",
            _pick(
                params, "rat_pairs_samples fspo_steps batch_size max_tokens seed domain include_dispreferred"
            ),
            lambda d: _rat_pairs(p, runner, d),
            ("episodes", "fspo_rat"),
        )
        cfg = {**trainings["fspo_rat"][0], "rat": "description", "max_steps": p.rat_pairs_steps}
        start = str(runner.folder("fspo_rat") / "model")
        runner.run(
            "fspo_rat_pairs",
            {k: v for k, v in cfg.items() if k not in ("model", "out", "episodes", "eval_episodes")},
            lambda d: _train_on_pairs(cfg, runner, d, start),
            ("episodes", "fspo_rat", "rat_pairs"),
        )
        trained += ("fspo_rat_pairs",)
    runner.run(
        "generate",
        {
            **_pick(params, "eval_episodes max_new_tokens seed include_dispreferred"),
            "systems": generated_systems(p),
        },
        lambda d: _generate(p, runner, d, model_dir),
        ("episodes", "model", *trained),
    )
    runner.run(
        "accuracy",
        _pick(params, "accuracy_shots eval_episodes beta"),
        lambda d: _accuracy(p, runner, d),
        ("episodes", *trained),
    )
    summary = runner.run(
        "report",
        {"systems": [s[0] for s in generated_systems(p)]},
        lambda d: _report(p, runner, d),
        ("sim", "generate", "accuracy"),
    )
    return summary


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


def _trainings(p: Profile, model_dir: str) -> dict[str, tuple[dict[str, Any], str | None]]:
    """Six runs: SFT → FSPO, SFT → RAT SFT → FSPO with RAT, and the zero-shot population pair."""
    common = {
        "batch_size": p.batch_size,
        "max_tokens": p.max_tokens,
        "seed": p.seed,
        "progress": True,
        "include_dispreferred": p.include_dispreferred,
        # Prompts are ~10x the answers: score both answers against one pass over the shots, with
        # length-bucketed batches and reference log-probs computed once (docs/speed.md).
        "logps_impl": "prefix",
        # The end-of-stage check only (loss, reward accuracy); the `accuracy` stage is the measurement.
        "eval_max_episodes": 64,
    }
    sft = {
        **common,
        "stage": "sft",
        "lr": p.sft_lr,
        "scheduler": "cosine",
        "max_steps": p.sft_steps,
        "shot_loss": p.sft_shot_loss,
    }
    ipo = {
        **common,
        "stage": "fspo",
        "loss": "ipo",
        "beta": p.beta,
        "nll_weight": p.fspo_nll_weight,
        "lr": p.fspo_lr,
        "scheduler": "cosine",
        "max_steps": p.fspo_steps,
    }
    # The population pair gets FSPO's budget: as many SFT and IPO steps, and its SFT sees as many
    # answers per step (a batch (shots + 1) times larger, since few-shot SFT trains on every shot's
    # answer too). So the two differ in what they condition on, not in how much they learned from.
    pop = {"shots": 0, "shot_loss": False}
    answers_per_episode = p.shots + 1 if p.sft_shot_loss else 1
    return {
        "sft": (sft, None),
        "fspo": (ipo, "sft"),
        "sft_rat": ({**sft, "rat": "target", "max_steps": p.rat_sft_steps, "lr": p.rat_sft_lr}, "sft"),
        "fspo_rat": ({**ipo, "rat": "target"}, "sft_rat"),
        "pop_sft": ({**sft, **pop, "batch_size": p.batch_size * answers_per_episode}, None),
        "pop_ipo": ({**ipo, **pop}, "pop_sft"),
    }


def _train(
    cfg: dict[str, Any], runner: StageRunner, folder: Path, start: str, train_file: Path | None = None
) -> dict[str, Any]:
    from fspo.train.config import TrainConfig
    from fspo.train.trainer import train

    episodes = runner.folder("episodes")
    config = TrainConfig(
        **cfg,
        model=start,
        episodes=str(train_file or episodes / "train.jsonl"),
        eval_episodes=str(episodes / "test_unseen.jsonl"),
        out=str(folder),
        save_every=max(1, cfg["max_steps"] // 4),
    )
    resume = (folder / "checkpoints").exists()
    result = train(config, resume=resume)
    return {"steps": result.steps, **{k: round(v, 4) for k, v in result.eval_metrics.items()}}


def _rat_pairs(p: Profile, runner: StageRunner, folder: Path) -> dict[str, Any]:
    """Description pairs sampled from FSPO+RAT on the first training episodes (`build_rat_pairs`)."""
    from fspo.data.episodes import load_episodes
    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer
    from fspo.train.rat_pairs import build_rat_pairs, description_scorer

    path = runner.folder("fspo_rat") / "model"
    # Twice the episodes the pair training reads: spare for episodes whose candidates all tie
    # (every sample right), which give no pair.
    n = p.rat_pairs_steps * p.batch_size * 2
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


def _train_on_pairs(cfg: dict[str, Any], runner: StageRunner, folder: Path, start: str) -> dict[str, Any]:
    """FSPO+RAT on the description pairs; with fewer pairs than one batch (every sample already
    right, or none differ) there is nothing to learn, and the stage keeps the model it starts from."""
    import shutil

    pairs = json.loads((runner.folder("rat_pairs") / "rat_pairs.json").read_text())["pairs"]
    if pairs < cfg["batch_size"]:
        runner.console.print(f"  {pairs} description pairs, fewer than a batch: FSPO+RAT is kept as it is")
        shutil.copytree(start, folder / "model")
        return {"steps": 0, "pairs": pairs}
    return _train(cfg, runner, folder, start, runner.folder("rat_pairs") / "train.jsonl")


def _test_episodes(p: Profile, runner: StageRunner) -> list:
    from fspo.data.episodes import load_episodes

    episodes = []
    for split in ("test_unseen", "test_seen"):
        episodes += load_episodes(runner.folder("episodes"), split)[: p.eval_episodes]
    return episodes


def _generate(p: Profile, runner: StageRunner, folder: Path, model_dir: str) -> dict[str, Any]:
    from fspo.data.template import TemplateOptions
    from fspo.eval import generate_for_episodes
    from fspo.models.loading import load_model, load_tokenizer

    episodes = _test_episodes(p, runner)
    counts = {}
    loaded: dict[str, tuple[Any, Any]] = {}  # several systems share a model (base, fspo, fspo_rat)
    for system, stage, mode, shots in generated_systems(p):
        path = model_dir if stage is None else str(runner.folder(stage) / "model")
        if path not in loaded:
            loaded[path] = (load_model(path), load_tokenizer(path))
        model, tokenizer = loaded[path]
        runner.console.print(f"  generating: {system} ({len(episodes)} episodes, mode {mode})")
        records = generate_for_episodes(
            model,
            tokenizer,
            episodes,
            mode=mode,
            shots=shots,
            system=system,
            max_new_tokens=p.max_new_tokens,
            seed=p.seed,
            batch_size=p.gen_batch_size,
            options=TemplateOptions(include_dispreferred=p.include_dispreferred),
            out=folder / f"{system}.jsonl",
            progress=True,
        )
        counts[system] = len(records)
    return counts


def _accuracy(p: Profile, runner: StageRunner, folder: Path) -> dict[str, Any]:
    from fspo.core.files import atomic_write_json
    from fspo.eval import accuracy_curve
    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer

    episodes = _test_episodes(p, runner)  # accuracy_curve groups them by split
    curves = {}
    for label, stage, ref in (
        ("fspo", "fspo", "sft"),
        ("fspo-rat", rat_stage(p), "sft_rat"),
        ("population-ipo", "pop_ipo", "pop_sft"),
    ):
        path = runner.folder(stage) / "model"
        curves[label] = accuracy_curve(
            load_model(path),
            load_tokenizer(path),
            episodes,
            shots=p.accuracy_shots,
            ref_model=load_model(runner.folder(ref) / "model"),
            beta=p.beta,
            options=trained_layout(path),  # as each was trained: shots' layout, RAT's description
            model_name=label,
            log=folder / f"accuracy.{label}.partial",  # a killed run resumes from its scored batches
        )
    atomic_write_json(folder / "accuracy.json", curves)
    for log in folder.glob("accuracy.*.partial"):
        log.unlink()
    return {label: _acc_at(c, p.shots) for label, c in curves.items()}


def _acc_at(curve: dict[str, Any], shots: int) -> dict[str, float]:
    out = {}
    for split, points in curve["splits"].items():
        best = [pt for pt in points if pt["shots"] <= shots]
        if best:
            out[split] = round(best[-1]["accuracy"], 4)
    return out


def _report(p: Profile, runner: StageRunner, folder: Path) -> dict[str, Any]:
    from fspo.data.io import read_dataset_dir
    from fspo.eval import collect_examples, winrate, write_report
    from fspo.eval.personal import description_quality, shot_ceiling, trait_shares
    from fspo.sim import disagreement_matrix

    gen = runner.folder("generate")
    users_file = runner.folder("sim") / "users.jsonl"
    results = []
    pairs = [(s[0], "base") for s in generated_systems(p) if s[0] != "base"]
    # Head to head: FSPO against each baseline (the base model can be far weaker than any trained
    # system, so beating it says little about personalization), and RAT against FSPO and its oracle.
    pairs += [
        ("fspo", "population-ipo"),
        ("fspo", "few-shot-prompting"),
        ("fspo", "few-shot-pref-ft"),
        ("fspo", "fspo-no-shots"),
        ("fspo-rat", "fspo"),
        ("oracle", "fspo"),
        ("oracle", "fspo-rat"),
        # RAT against its upper bound, both against the population: the share of the oracle's win
        # rate RAT recovers; and the oracle against FSPO without shots: a stated description is used.
        ("fspo-rat", "population-ipo"),
        ("oracle", "population-ipo"),
        ("oracle", "fspo-no-shots"),
    ]
    # The shots curve: all the shots against fewer (the paper's 4 vs 8), fewer against the
    # population, and FSPO+RAT against FSPO at each number of shots.
    for k in p.also_shots:
        pairs += [
            ("fspo", f"fspo-{k}-shots"),
            (f"fspo-{k}-shots", "population-ipo"),
            (f"fspo-rat-{k}-shots", "population-ipo"),
            (f"fspo-rat-{k}-shots", f"fspo-{k}-shots"),
        ]
    for system, opponent in pairs:
        res = winrate(
            gen / f"{system}.jsonl",
            gen / f"{opponent}.jsonl",
            users_file,
            "exact",
            system=system,
            opponent=opponent,
        )
        results.extend(res.results)
    prefs, users, _ = read_dataset_dir(runner.folder("sim"))
    generations = {
        s[0]: [json.loads(line) for line in (gen / f"{s[0]}.jsonl").read_text().splitlines()]
        for s in generated_systems(p)
    }
    test = _test_episodes(p, runner)
    user_map = {u.user_id: u for u in users}
    examples = collect_examples(generations, test, user_map)
    accuracy = json.loads((runner.folder("accuracy") / "accuracy.json").read_text())
    shares = trait_shares(user_map, [r for recs in generations.values() for r in recs])
    by_split = {s: [e for e in test if e.split == s] for s in ("test_unseen", "test_seen")}
    ceiling = shot_ceiling(user_map, by_split, max_shots=p.shots)
    notes = [
        f"Profile: {p.model_dump_json()}",
        "Win rates are judged by each simulated user's exact reward r_u(text); ties count as half.",
        _unseen_note(p),
    ]
    rat_systems = [s[0] for s in generated_systems(p) if s[2] == "rat"]
    descriptions = {name: description_quality(user_map, generations[name]) for name in rat_systems}
    notes += _findings(results, descriptions)
    write_report(
        folder,
        results,
        accuracy,
        examples,
        disagreement_matrix(users, prefs),
        title=f"FSPO quickstart: simulated {p.domain} users",
        notes=notes,
        sections={
            "Trait values the answers carry": _shares_markdown(shares),
            "What the shots can tell: the Bayes ceiling": _ceiling_markdown(ceiling, accuracy),
            "RAT's inferred descriptions": _descriptions_markdown(descriptions),
        },
    )
    merged: dict[str, dict[str, Any]] = {}
    for w in results:
        merged.setdefault(f"{w.system} vs {w.opponent}", {})[w.split] = {
            "win_rate": round(w.win_rate, 4),
            "ci": [round(w.ci_low, 4), round(w.ci_high, 4)],
            "n": w.n,
        }
    return {
        "winrates": merged,
        "trait_shares": shares,
        "descriptions": descriptions,
        "ceiling": ceiling,
        "accuracy": {name: _acc_at(curve, p.shots) for name, curve in accuracy.items()},
        "report": str(folder / "report.md"),
    }


def _shares_markdown(shares: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = [
        "Per system, the mean share of each user's trait values its answers carry (`fspo.eval.personal`;",
        "a personalizing model carries nearly all, one answering for the population average carries what",
        "the average user's values share with each user's), and the relevance every user rewards alike.",
        "",
        "| system | unseen: trait share | unseen: relevance | seen: trait share | seen: relevance |",
        "|---|---|---|---|---|",
    ]
    for system, per in shares.items():
        cells = []
        for split in ("test_unseen", "test_seen"):
            c = per.get(split)
            cells += [f"{100 * c['trait_share']:.1f}%", f"{c['relevance']:.3f}"] if c else ["-", "-"]
        rows.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _descriptions_markdown(quality: dict[str, dict[str, Any]]) -> str:
    rows = [
        "How often the description a RAT system writes names the user's true value of each trait",
        "(`fspo.eval.personal.description_quality`), and how often its answer carries the values its own",
        "description names.",
        "",
        "| system | split | true values named | per trait | extra traits per answer | answer follows it |",
        "|---|---|---|---|---|---|",
    ]
    for system, per in quality.items():
        for split, q in per.items():
            traits = ", ".join(f"{t} {100 * c['accuracy']:.0f}%" for t, c in q["per_trait"].items())
            follows = "-" if q["follows"] is None else f"{100 * q['follows']:.0f}% of {q['stated']}"
            rows.append(
                f"| {system} | {split} | {100 * q['named']:.1f}% of {q['values']} | {traits} | "
                f"{q['extra_per_record']:.2f} | {follows} |"
            )
    main = quality.get("fspo-rat", {}).get("test_unseen")
    if main:
        rows += ["", "Confusion on unseen users (fspo-rat): true value → what the description named.", ""]
        for trait, table in main["confusion"].items():
            named = sorted({k for row in table.values() for k in row})
            rows += [
                f"| {trait}: true \\ named | " + " | ".join(named) + " |",
                "|---" * (len(named) + 1) + "|",
            ]
            for value, row in sorted(table.items()):
                rows.append(f"| {value} | " + " | ".join(str(row.get(k, 0)) for k in named) + " |")
            rows.append("")
    return "\n".join(rows)


def _ceiling_markdown(ceiling: dict[str, dict[str, dict[str, float]]], accuracy: dict[str, Any]) -> str:
    rows = [
        "Preference accuracy a Bayes learner reaches from n shots, holding the population's personas as",
        "hypotheses (`fspo.eval.personal.shot_ceiling`), beside FSPO's implicit-reward accuracy.",
        "",
        "| split | shots | ceiling | FSPO accuracy | share of the ceiling |",
        "|---|---|---|---|---|",
    ]
    splits = accuracy.get("fspo", {}).get("splits", {})
    fspo = {split: {pt["shots"]: pt["accuracy"] for pt in points} for split, points in splits.items()}
    for split, curve in ceiling.items():
        for n, c in curve.items():
            mine = fspo.get(split, {}).get(int(n))
            share = f"{100 * mine / c['accuracy']:.0f}%" if mine is not None and c["accuracy"] else "-"
            shown = "-" if mine is None else f"{mine:.3f}"
            bound = f"{c['accuracy']:.3f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
            rows.append(f"| {split} | {n} | {bound} | {shown} | {share} |")
    return "\n".join(rows)


def _unseen_note(p: Profile) -> str:
    if p.sim_options.get("holdout") == "users":
        return "'unseen' users were held out of training at random; training users share their traits."
    return "'unseen' users hold trait combinations that no training user has."


def _findings(results: list, descriptions: dict[str, Any] | None = None) -> list[str]:
    """Plain-language verdicts on unseen users, derived from the tables (never hard-coded)."""
    cell = {(w.system, w.opponent): w for w in results if w.split == "unseen"}

    def verdict(system: str, opponent: str) -> str | None:
        w = cell.get((system, opponent))
        if w is None:
            return None
        word = "beats" if w.ci_low > 0.5 else "loses to" if w.ci_high < 0.5 else "is not distinguishable from"
        return f"{system} {word} {opponent} on unseen users ({100 * w.win_rate:.1f}%, n={w.n})"

    pairs = (
        ("fspo", "fspo-no-shots"),
        ("fspo", "population-ipo"),
        ("fspo", "few-shot-pref-ft"),
        ("fspo-rat", "fspo"),
        ("oracle", "fspo-rat"),
        ("oracle", "fspo-no-shots"),
    )
    found = [v for v in (verdict(*pair) for pair in pairs) if v]
    rat, oracle = cell.get(("fspo-rat", "population-ipo")), cell.get(("oracle", "population-ipo"))
    if rat and oracle and oracle.win_rate > 0:
        found.append(
            f"fspo-rat recovers {100 * rat.win_rate / oracle.win_rate:.0f}% of the oracle's win rate against "
            f"population-ipo on unseen users ({100 * rat.win_rate:.1f}% vs {100 * oracle.win_rate:.1f}%)"
        )
    quality = (descriptions or {}).get("fspo-rat", {}).get("test_unseen")
    if quality:
        follows = "-" if quality["follows"] is None else f"{100 * quality['follows']:.0f}%"
        found.append(
            f"fspo-rat's inferred descriptions name {100 * quality['named']:.0f}% of unseen users' true "
            f"trait values (n={quality['values']}); its answers carry {follows} of the values their "
            "own description names"
        )
    return found


def _print_table(console: Console, summary: dict[str, Any], timings: dict[str, float]) -> None:
    table = Table(title="FSPO quickstart: win rate (exact-reward judge), 95% CI, n")
    table.add_column("system vs opponent")
    for split in ("unseen", "seen"):
        table.add_column(f"{split} users", justify="right")
    for row, cells in summary.get("winrates", {}).items():
        table.add_row(row, *(_fmt(cells.get(split)) for split in ("unseen", "seen")))
    console.print(table)
    total = sum(timings.values())
    console.print(f"Report: {summary.get('report')}   (this run: {total / 60:.1f} min)")


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    lo, hi = cell["ci"]
    return f"{100 * cell['win_rate']:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}] n={cell['n']}"
