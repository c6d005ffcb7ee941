"""The `fspo eval`, `fspo generate` and `fspo report` commands (thin wrappers over the Python API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fspo.core.errors import UserError
from fspo.core.outputs import claim_file
from fspo.infer.generate import Decoding

console = Console()


def _parse_shots(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise UserError(
            f"--shots: expected comma-separated integers such as 0,1,2,4,8, got {text!r}"
        ) from err
    if not values or any(v < 0 for v in values):
        raise UserError(f"--shots: expected non-negative integers, got {text!r}")
    return values


def _partial_log(out: Path, overwrite: bool, what: str) -> Path:
    """`out`'s ``.partial`` append log, where a command keeps what it finished until the result is
    written, so that a rerun resumes from it; `overwrite` starts over without it."""
    from fspo.eval.generate import partial_path

    log = partial_path(out)
    if overwrite:
        log.unlink(missing_ok=True)
    if log.exists():
        console.print(f"resuming: the {what} in {log} (a stopped run's) are kept")
    return log


def _require_descriptions(layout: Any, groups: dict[str, list[Any]], model: Path, episodes: Path) -> None:
    """A model trained with RAT is scored on targets that carry the user's description, so every test
    episode needs one (`TemplateOptions.description` other than none)."""
    from fspo.data.template import DescriptionMode

    if layout.description is DescriptionMode.NONE:
        return
    eps = [e for split in groups.values() for e in split]
    missing = sum(1 for e in eps if not (e.description or "").strip())
    if missing:
        raise UserError(
            f"{episodes}: {missing} of {len(eps)} episodes have no user description, but --model {model} "
            "was trained with RAT, whose targets start with one; build the episodes from users with "
            "descriptions"
        )


def accuracy(
    model: Path = typer.Option(..., help="Model folder (the policy)."),
    episodes: Path = typer.Option(..., help="Episodes folder (test_seen + test_unseen) or an episode file."),
    ref: Path | None = typer.Option(
        None, help="Reference model folder; without it, plain log-likelihood ranking."
    ),
    shots: str = typer.Option("0,1,2,4,8", help="Numbers of shots, comma-separated."),
    beta: float = typer.Option(1.0, help="Implicit-reward scale (changes no ranking; recorded)."),
    batch_size: int = typer.Option(8, min=1),
    max_episodes: int | None = typer.Option(
        None, min=1, help="At most this many episodes per split (quick runs)."
    ),
    out: Path = typer.Option(
        Path("accuracy.json"), help="Output JSON (a killed run resumes from its .partial log)."
    ),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    dispreferred: bool | None = typer.Option(
        None, help="Show the shots' dispreferred answers (default: as the model was trained)."
    ),
) -> None:
    """Preference accuracy of the model's implicit reward, per split, vs the number of shots."""
    from fspo.core.files import atomic_write_json
    from fspo.eval.accuracy import accuracy_curve, group_by_split
    from fspo.eval.readers import load_test_episodes
    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer, require_same_tokenizer

    ks = _parse_shots(shots)
    claim_file(out, overwrite=overwrite)
    groups = group_by_split(load_test_episodes(episodes))
    if max_episodes is not None:
        groups = {s: eps[:max_episodes] for s, eps in groups.items()}
    layout = trained_layout(model, dispreferred)
    _require_descriptions(layout, groups, model, episodes)
    tokenizer = load_tokenizer(model)
    if ref is not None:  # the reference scores the policy's token ids: they must mean the same text
        require_same_tokenizer(tokenizer, ref, "--ref", f"--model {str(model)!r}")
    log = _partial_log(out, overwrite, "batches scored")
    result = accuracy_curve(
        load_model(model),
        tokenizer,
        groups,
        ks,
        ref_model=load_model(ref) if ref else None,
        beta=beta,
        batch_size=batch_size,
        options=layout,
        model_name=str(model),
        ref_name=str(ref) if ref else None,
        log=log,
    )
    atomic_write_json(out, result)
    log.unlink(missing_ok=True)
    table = Table(title=f"Preference accuracy ({result['scoring']})")
    table.add_column("split")
    for k in ks:
        table.add_column(f"{k} shots")
    for split, points in result["splits"].items():
        table.add_row(
            split,
            *[f"{p['accuracy']:.3f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}] n={p['n']}" for p in points],
        )
    console.print(table)
    if result["scoring"] == "log_likelihood":
        console.print("[yellow]no --ref: pairs ranked by plain log-likelihood, not an implicit reward[/]")
    console.print(f"wrote {out}")


def _require_two_files(a: str | Path, b: str | Path) -> None:
    """Refuse one file given as both systems: every pair would tie and report 0.500 as if measured
    (the Python API allows it, as a check that a judge ties a system with itself)."""
    try:
        same = Path(a).samefile(b)  # also through a link or another spelling of the path
    except OSError:
        return  # a missing file: reading it says so
    if same:
        raise UserError(
            f"--a and --b are the same file ({a}): a system judged against itself ties every pair; "
            "give the opponent's generations as --b"
        )


def winrate(
    a: Path = typer.Option(..., "--a", help="Generations of the system under test (JSONL)."),
    b: Path = typer.Option(..., "--b", help="Generations of the opponent, e.g. the base model (JSONL)."),
    users: Path = typer.Option(..., help="Users file (descriptions; sim metadata for the exact judge)."),
    judge: str = typer.Option("exact", help="exact | openai | local"),
    judge_model: str | None = typer.Option(None, help="openai: model name; local: model folder."),
    base_url: str | None = typer.Option(None, help="openai: endpoint (default: FSPO_JUDGE_BASE_URL/OpenAI)."),
    cache: Path | None = typer.Option(None, help="openai: request cache (SQLite); default beside --out."),
    workers: int = typer.Option(4, min=1, help="openai: concurrent requests."),
    price_prompt: float = typer.Option(0.0, help="openai: USD per million prompt tokens (cost counter)."),
    price_completion: float = typer.Option(0.0, help="openai: USD per million completion tokens."),
    system: str | None = typer.Option(None, help="Name of system A (default: from the records)."),
    opponent: str | None = typer.Option(None, help="Name of system B (default: from the records)."),
    out: Path = typer.Option(Path("winrate.json"), help="Output JSON (results, per-pair scores, usage)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Win rate of A against B, judged pair by pair (ties count half), with a Wilson CI."""
    from fspo.eval.judges import JUDGES
    from fspo.eval.winrates import winrate as run_winrate

    _require_two_files(a, b)
    claim_file(out, overwrite=overwrite)
    options: dict = {}
    if judge == "openai":
        options = {
            "model": judge_model,
            "base_url": base_url,
            "cache_path": cache or out.with_suffix(".cache.sqlite"),
            "price_prompt_per_mtok": price_prompt,
            "price_completion_per_mtok": price_completion,
        }
    elif judge == "local":
        options = {"model_path": judge_model}
    elif judge not in JUDGES:
        raise UserError(f"unknown judge {judge!r}; known judges: {', '.join(JUDGES)}")
    result = run_winrate(
        a, b, users, judge, system=system, opponent=opponent, judge_options=options, workers=workers, out=out
    )
    table = Table(title=f"{result.results[0].system} vs {result.results[0].opponent} (judge: {judge})")
    for col in ("split", "win rate", "95% CI", "n", "W/T/L"):
        table.add_column(col)
    for r in result.results:
        table.add_row(
            r.split,
            f"{r.win_rate:.3f}",
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
            str(r.n),
            f"{r.wins}/{r.ties}/{r.losses}",
        )
    console.print(table)
    if result.usage:
        console.print(f"judge usage: {result.usage}")
    for note in result.notes:
        console.print(f"note: {note}", style="yellow", highlight=False, markup=False)
    console.print(f"wrote {out}")


def _reference(model: Path, ref: Path | None, best_of: int) -> Any:
    """Best-of-N's reference (`fspo.infer.best_of.Reference`): `ref`, else the model training started
    from, else (no training record) the model itself; None for one answer."""
    from fspo.infer.best_of import SELF, Reference, training_reference
    from fspo.models.loading import load_model

    if best_of == 1:
        return None
    folder, beta = training_reference(model, ref)
    if folder is None:
        return Reference(None, SELF, beta)
    return Reference(load_model(folder), folder, beta)


def _checked_decoding(mode: str, best_of: int, ref: Path | None, values: dict[str, Any]) -> Decoding:
    """`fspo generate`'s decoding from its option `values`, once the mode, the decoding and
    --best-of/--ref are known to go together (a `UserError` naming the option otherwise)."""
    from fspo.infer.best_of import check_best_of
    from fspo.infer.generate import Mode

    try:
        Mode(mode)
    except ValueError as err:
        raise UserError(f"--mode: unknown mode {mode!r}; use plain, rat or oracle") from err
    decoding = Decoding.of("fspo generate", **values)
    check_best_of(best_of, decoding, mode)
    if ref is not None and best_of == 1:
        raise UserError("--ref is the reference of --best-of N > 1; it does nothing for one answer")
    return decoding


def _check_rat_inputs(mode: str, shots: int | None, model: Path, episodes: Path, eps: list[Any]) -> None:
    """RAT writes the user's description from the shots, then answers from it: refuse a model never
    trained to write one, and shots it would describe from nothing (either gives confident nonsense)."""
    from fspo.data.template import DescriptionMode
    from fspo.infer.layout import CONFIG_FILE, trained_layout

    if mode != "rat":
        return
    if shots == 0:
        raise UserError(
            "--mode rat --shots 0: RAT writes the user's description from their shots, and with none it "
            "describes nobody; use --mode plain --shots 0 for an answer without shots, or --shots 1 or more"
        )
    trained = (model / CONFIG_FILE).is_file()
    if trained and trained_layout(model).description is DescriptionMode.NONE:
        raise UserError(
            f"--mode rat: --model {model} was trained without RAT (its {CONFIG_FILE} has rat: none), so "
            "it never learned to write a user description; use --mode plain, or a model trained with --rat"
        )
    empty = sum(1 for e in eps if not e.shots)
    if empty:
        raise UserError(
            f"--mode rat: {empty} of {len(eps)} episodes in {episodes} have no shots to describe the user "
            "from; use --mode plain for them, or episodes with shots (data episodes -n 1 or more)"
        )


_DECODING = Decoding.model_fields  # the decoding options' defaults and help live in `Decoding`


def generate(
    model: Path = typer.Option(..., help="Model folder."),
    episodes: Path = typer.Option(..., help="Episode file, or episodes folder (its test splits)."),
    out: Path = typer.Option(..., help="Output JSONL (resumes if it or its .partial log exists)."),
    mode: str = typer.Option(
        "plain", help="plain | rat (model writes a user description) | oracle (true one)."
    ),
    shots: int | None = typer.Option(None, min=0, help="Use each episode's first k shots (default: all)."),
    system: str | None = typer.Option(None, help="System name in reports (default: the mode)."),
    users: Path | None = typer.Option(None, help="Users file: descriptions for oracle mode."),
    max_new_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(
        _DECODING["temperature"].default, help=_DECODING["temperature"].description
    ),
    top_p: float = typer.Option(_DECODING["top_p"].default, help=_DECODING["top_p"].description),
    repetition_penalty: float = typer.Option(
        _DECODING["repetition_penalty"].default, help=_DECODING["repetition_penalty"].description
    ),
    no_repeat_ngram_size: int = typer.Option(
        _DECODING["no_repeat_ngram_size"].default, help=_DECODING["no_repeat_ngram_size"].description
    ),
    seed: int = typer.Option(_DECODING["seed"].default, help=_DECODING["seed"].description),
    best_of: int = typer.Option(
        1, min=1, help="Sample N answers per episode, keep the one with the highest implicit reward."
    ),
    ref: Path | None = typer.Option(
        None,
        help="--best-of's reference model (default: the model training started from, per its "
        "fspo_config.json; an untrained model is its own reference, without shots).",
    ),
    batch_size: int = typer.Option(8, min=1),
    dispreferred: bool | None = typer.Option(
        None, help="Show the shots' dispreferred answers (default: as the model was trained)."
    ),
    overwrite: bool = typer.Option(False, help="Discard --out and its .partial log and generate anew."),
) -> None:
    """Generate a personalized answer for each test episode from its user's shots."""
    from fspo.eval.generate import generate_for_episodes
    from fspo.eval.readers import load_test_episodes, users_by_id
    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer

    values = {"temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty}
    values.update(no_repeat_ngram_size=no_repeat_ngram_size, seed=seed)
    decoding = _checked_decoding(mode, best_of, ref, values)  # before any model is loaded
    claim_file(out, resumes=True)  # a file of the same settings is continued (checked per record)
    if overwrite:
        out.unlink(missing_ok=True)
    _partial_log(out, overwrite, "generations")
    eps = load_test_episodes(episodes)
    _check_rat_inputs(mode, shots, model, episodes, eps)
    records = generate_for_episodes(
        load_model(model),
        load_tokenizer(model),
        eps,
        mode=mode,
        shots=shots,
        system=system,
        max_new_tokens=max_new_tokens,
        decoding=decoding,
        best_of=best_of,
        reference=_reference(model, ref, best_of),
        batch_size=batch_size,
        options=trained_layout(model, dispreferred),  # the mode sets the description layout
        users=users_by_id(users) if users else None,
        out=out,
        progress=True,
    )
    truncated = sum(r["truncated"] for r in records)
    how = decoding.describe() + (f", best of {best_of}" if best_of > 1 else "")
    cut = f", {truncated} hit max-new-tokens" if truncated else ""
    console.print(f"wrote {len(records)} generations to {out} ({how}{cut})")


def report(
    run_dir: Path = typer.Argument(
        ..., help="Run folder holding win-rate/accuracy JSON and generation JSONL."
    ),
    out: Path | None = typer.Option(None, help="Report folder (default RUN_DIR/report)."),
    users: Path | None = typer.Option(None, help="Users file (default: users.jsonl found under RUN_DIR)."),
    preferences: Path | None = typer.Option(None, help="Preferences for the disagreement matrix."),
    episodes: Path | None = typer.Option(None, help="Episode file for the shot summaries of examples."),
    title: str | None = typer.Option(None),
    overwrite: bool = typer.Option(False, help="Replace a report of another run in --out."),
) -> None:
    """Markdown + HTML report (tables, accuracy and disagreement plots, examples) and results.json."""
    from fspo.core.outputs import OutputFolder
    from fspo.eval.report import OUTPUTS
    from fspo.eval.run_report import report_from_run

    out = out or run_dir / "report"
    inputs = {"run": run_dir, "users": users, "preferences": preferences, "episodes": episodes}
    params = {**{k: v and str(Path(v).resolve()) for k, v in inputs.items()}, "title": title}
    folder = OutputFolder(out, "report", params, OUTPUTS, overwrite=overwrite)  # the same inputs: refreshed
    with folder.writing():
        paths = report_from_run(
            run_dir, out, users=users, preferences=preferences, episodes=episodes, title=title
        )
    for name, path in paths.items():
        console.print(f"{name}: {path}")


def register(app: typer.Typer) -> None:
    eval_app = typer.Typer(help="Evaluate: preference accuracy, win rates.", no_args_is_help=True)
    eval_app.command("accuracy")(accuracy)
    eval_app.command("winrate")(winrate)
    app.add_typer(eval_app, name="eval")
    app.command("generate")(generate)
    app.command("report")(report)
