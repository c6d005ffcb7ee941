"""The `fspo data` sub-commands: import released datasets, sample episodes, validate, convert.

A data folder holds ``preferences.jsonl`` and ``users.jsonl`` (Parquet accepted); an episode
folder holds ``train.jsonl``, ``test_seen.jsonl``, ``test_unseen.jsonl`` and ``meta.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from fspo.data.schema import RECORD_TYPES, Preference, User

if TYPE_CHECKING:
    from fspo.data.episodes import EpisodeSplits
    from fspo.data.io import ReadReport

app = typer.Typer(
    help="Data: import released datasets, sample few-shot episodes, validate, convert.", no_args_is_help=True
)

# soft_wrap: never break a 'file:line: field' message in the middle of a path.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _note(message: str) -> None:
    err_console.print(f"[yellow]note:[/] {message}", highlight=False)


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="The released dataset file (.jsonl, .parquet or .csv)."),
    format: str = typer.Option(..., "--format", "-f", help="Its schema: roleplay, review or elix."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Data folder to write (preferences.jsonl, users.jsonl)."
    ),
    scorer_match: bool = typer.Option(
        True, help="ELIX: keep only rows whose scorer_level wrote one of the two answers (official filter)."
    ),
    overwrite: bool = typer.Option(False, help="Replace the outputs of another run in --out."),
) -> None:
    """Import one of the FSPO paper's released datasets into a data folder."""
    from fspo.core.outputs import OutputFolder
    from fspo.data.adapters import import_released
    from fspo.data.io import DATASET_OUTPUTS, write_dataset_dir

    params = {"file": os.path.realpath(file), "format": format, "scorer_match": scorer_match}
    folder = OutputFolder(out, "data import", params, DATASET_OUTPUTS, overwrite=overwrite)
    with folder.preparing():
        result = import_released(file, format, scorer_match=scorer_match)
    for note in result.notes:
        _note(note)
    with folder.writing():
        n_prefs, n_users = write_dataset_dir(out, result.preferences, result.users)
    console.print(f"imported {n_prefs} preferences of {n_users} users from {result.rows} rows into {out}")


@app.command()
def episodes(
    data: Path = typer.Option(
        ..., "--data", "-d", help="Data folder with preferences.jsonl and users.jsonl."
    ),
    shots: int = typer.Option(..., "--shots", "-n", help="Shots (labeled preferences) per episode."),
    out: Path = typer.Option(..., "--out", "-o", help="Episode folder to write."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same episodes."),
    test_user_fraction: float = typer.Option(
        0.2, help="Share of users (without metadata.split) held out as unseen test users."
    ),
    heldout_per_user: int = typer.Option(2, help="Questions per training user held out for test_seen."),
    train_passes: int | None = typer.Option(
        None, help="Passes over each training user; default 2*(shots+1)."
    ),
    test_passes: int = typer.Option(1, help="Passes for the test splits."),
    questions_per_context: int = typer.Option(
        1, min=1, help="Queries per shot set, kept adjacent (for `fspo train --questions-per-context K`)."
    ),
    skip_invalid: bool = typer.Option(False, help="Skip invalid records (and list them) instead of failing."),
    on_duplicate: str = typer.Option(
        "error",
        "--on-duplicate",
        help="Records that conflict (one user id twice with other content, or one preference with its "
        "label swapped): error, or keep the first or the last of each. An exact repeat is kept once.",
    ),
    overwrite: bool = typer.Option(False, help="Replace the outputs of another run in --out."),
) -> None:
    """Sample few-shot episodes (train, test_seen, test_unseen) from a data folder."""
    from fspo.core.errors import UserError
    from fspo.core.outputs import OutputFolder
    from fspo.data.episodes import OUTPUTS, SPLITS, build_episodes, write_episodes

    settings = {
        "data": os.path.realpath(data), "shots": shots, "seed": seed,
        "test_user_fraction": test_user_fraction, "heldout_per_user": heldout_per_user,
        "train_passes": train_passes, "test_passes": test_passes,
        "questions_per_context": questions_per_context, "skip_invalid": skip_invalid,
        "on_duplicate": on_duplicate,
    }  # fmt: skip
    folder = OutputFolder(out, "data episodes", settings, OUTPUTS, overwrite=overwrite)
    with folder.preparing():
        prefs, users, reports = _read_data(data, skip_invalid, on_duplicate)
        result = build_episodes(
            prefs,
            users,
            shots=shots,
            train_passes=train_passes,
            test_passes=test_passes,
            test_user_fraction=test_user_fraction,
            heldout_per_user=heldout_per_user,
            seed=seed,
            questions_per_context=questions_per_context,
        )
    for line in result.report.lines(shots):
        _note(line)
    if not any(result[split] for split in SPLITS):
        raise UserError(
            f"--shots {shots}: no user of {data} has enough distinct preferences for one episode "
            f"(each needs at least {shots + 1}); nothing was written"
        )
    meta = {
        "source": str(data), "seed": seed, "shots": shots, "questions_per_context": questions_per_context,
        "train_passes": 2 * (shots + 1) if train_passes is None else train_passes,
        "test_passes": test_passes, "test_user_fraction": test_user_fraction,
        "heldout_per_user": heldout_per_user, "skipped_invalid_records": sum(r.skipped for r in reports),
        "on_duplicate": on_duplicate, "dropped_duplicate_records": sum(len(r.dropped) for r in reports),
    }  # fmt: skip
    with folder.writing():
        write_episodes(out, result, meta)
    _print_splits(result, f"episodes ({shots} shots, seed {seed}) in {out}")


def _read_data(
    data: Path, skip_invalid: bool, on_duplicate: str
) -> tuple[list[Preference], list[User], list[ReadReport]]:
    """`read_dataset_dir`, saying what it skipped and which repeated records it left out."""
    from fspo.data.io import read_dataset_dir

    prefs, users, reports = read_dataset_dir(data, skip_invalid=skip_invalid, on_duplicate=on_duplicate)
    for rep in reports:
        if rep.skipped:
            _note(rep.summary())
        _note_dropped(rep)
    return prefs, users, reports


def _note_dropped(report: ReadReport) -> None:
    for line in report.dropped[:20]:
        _note(line)
    if len(report.dropped) > 20:
        _note(f"{report.path}: ... and {len(report.dropped) - 20} more repeated records left out")


def _print_splits(result: EpisodeSplits, title: str) -> None:
    """Users and episodes per split, as a table."""
    from fspo.data.episodes import SPLITS

    rep = result.report
    users_per_split = {
        "train": len(rep.train_users),
        "test_seen": len({e.user_id for e in result["test_seen"]}),
        "test_unseen": len(rep.test_users),
    }
    table = Table(title=title)
    table.add_column("split")
    table.add_column("users", justify="right")
    table.add_column("episodes", justify="right")
    for split in SPLITS:
        table.add_row(split, str(users_per_split[split]), str(len(result[split])))
    console.print(table)


@app.command()
def validate(
    file: Path = typer.Argument(..., help="A .jsonl/.json/.parquet file of records."),
    kind: str = typer.Option(..., "--kind", "-k", help="Record kind: preference, user or episode."),
    skip_invalid: bool = typer.Option(False, help="Report invalid records instead of failing."),
) -> None:
    """Check every record of a file with the rules of every reader that uses it; exit status 2 and a list
    of 'file:line: field: message' if bad."""
    from fspo.core.errors import UserError
    from fspo.data.validate import validate_file

    if kind not in RECORD_TYPES:
        raise UserError(f"--kind must be one of {', '.join(RECORD_TYPES)}, got {kind!r}")
    report = validate_file(file, RECORD_TYPES[kind], skip_invalid=skip_invalid)
    if report.skipped:
        _note(report.summary())
    _note_dropped(report)
    console.print(
        f"{file}: {report.valid} valid {kind} records"
        + (f", {report.skipped} invalid" if report.skipped else "")
    )


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Input file (.jsonl/.json/.parquet)."),
    dst: Path = typer.Argument(..., help="Output file (.jsonl/.json/.parquet)."),
    kind: str | None = typer.Option(
        None, "--kind", "-k", help="preference, user or episode; guessed from the file name if omitted."
    ),
    skip_invalid: bool = typer.Option(False, help="Skip invalid records (and list them) instead of failing."),
    overwrite: bool = typer.Option(False, help="Replace DST if it exists."),
) -> None:
    """Convert a record file between JSONL and Parquet (records are validated on the way)."""
    from fspo.core.errors import UserError
    from fspo.core.outputs import claim_file
    from fspo.data.io import read_records_with_report, write_records

    kind = kind or _guess_kind(src)
    if kind not in RECORD_TYPES:
        raise UserError(f"--kind must be one of {', '.join(RECORD_TYPES)}, got {kind!r}")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise UserError(f"{dst}: input and output are the same file")
    claim_file(dst, "DST", overwrite=overwrite)
    records, report = read_records_with_report(src, RECORD_TYPES[kind], skip_invalid=skip_invalid)  # type: ignore[arg-type]
    if report.skipped:
        _note(report.summary())
    n = write_records(dst, records)
    console.print(f"wrote {n} {kind} records to {dst}")


def _guess_kind(path: Path) -> str:
    """preferences.* -> preference, users.* -> user, train/test_*.* -> episode."""
    from fspo.core.errors import UserError

    stem = path.stem.lower()
    if "pref" in stem:
        return "preference"
    if "user" in stem:
        return "user"
    if "episode" in stem or stem in ("train", "test_seen", "test_unseen"):
        return "episode"
    raise UserError(f"{path}: cannot tell the record kind from the name; pass --kind preference|user|episode")
