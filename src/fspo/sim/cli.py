"""The `fspo sim` sub-commands: simulate a population, inspect one, dump a pre-training corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fspo.core.errors import UserError

app = typer.Typer(help="Simulated users with exact rewards (roleplay, reviews, elix).", no_args_is_help=True)
console = Console()


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, lists), else text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option expects key=value, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


@app.command()
def run(
    domain: str = typer.Option("roleplay", help="roleplay, reviews or elix."),
    users: int = typer.Option(1500, help="Number of simulated users."),
    prefs_per_user: int = typer.Option(100, help="Labelled preferences per user."),
    seed: int = typer.Option(0, help="Random seed (the run is reproducible from it)."),
    out: Path = typer.Option(..., help="Output folder: users.jsonl, preferences.jsonl, sim_meta.json."),
    option: list[str] = typer.Option([], help="Domain option key=value, e.g. margin=0.3 (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace the outputs of another run in --out."),
) -> None:
    """Simulate a population and write it; prints its diversity and disagreement."""
    from fspo.core.outputs import OutputFolder
    from fspo.sim import simulate, stats, write_sim
    from fspo.sim.export import OUTPUTS

    options = _parse_options(option)
    params = {"domain": domain, "users": users, "prefs_per_user": prefs_per_user, "seed": seed, **options}
    folder = OutputFolder(out, "sim run", params, OUTPUTS, overwrite=overwrite)
    with console.status(f"simulating {users} {domain} users"):
        with folder.preparing():
            data = simulate(domain, users, prefs_per_user, seed, **options)
            summary = stats(data)
        with folder.writing():
            write_sim(out, data, summary)
    print_stats(summary, data.info)
    console.print(f"[green]wrote[/] {out}/users.jsonl, preferences.jsonl, sim_meta.json")


@app.command("stats")
def stats_cmd(folder: Path = typer.Argument(..., help="A folder written by `fspo sim run`.")) -> None:
    """Recompute and print the statistics of a simulated population folder."""
    from fspo.sim import read_sim, stats

    users, prefs = read_sim(folder)
    meta_path = folder / "sim_meta.json"
    info = json.loads(meta_path.read_text()).get("info", {}) if meta_path.exists() else {}
    print_stats(stats(users=users, preferences=prefs), info)


@app.command()
def corpus(
    out: Path = typer.Option(
        ..., help="A .jsonl file ({'text': ...} a line) or .txt (blank-line separated)."
    ),
    domain: str = typer.Option("roleplay", help="roleplay, reviews or elix."),
    n: int = typer.Option(50_000, help="Number of documents."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Write plain domain text for pre-training the embedded small model."""
    from fspo.core.files import atomic_open, atomic_write_jsonl
    from fspo.core.outputs import claim_file
    from fspo.sim import corpus as make_corpus

    claim_file(out, overwrite=overwrite)

    docs = make_corpus(domain, seed=seed, n=n)
    if out.suffix == ".jsonl":
        atomic_write_jsonl(out, ({"text": d} for d in docs))
    elif out.suffix == ".txt":
        with atomic_open(out) as f:
            f.write("\n\n".join(docs) + "\n")
    else:
        raise UserError(f"{out}: corpus files must end in .jsonl or .txt")
    console.print(f"[green]wrote[/] {len(docs)} documents to {out}")


def print_stats(summary: dict[str, Any], info: dict[str, Any]) -> None:
    table = Table(title=f"simulated population: {summary['domain']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    skip = {"trait_coverage", "disagreement", "domain"}
    for key, value in summary.items():
        if key not in skip:
            table.add_row(key.replace("_", " "), _fmt(value))
    for key, value in info.items():
        if key not in summary:
            table.add_row(key.replace("_", " "), _fmt(value))
    cov = summary.get("trait_coverage", {})
    if cov:
        table.add_row("trait values used", f"{len(cov)} (least used: {min(cov.values())} users)")
    console.print(table)
    dis = Table(title="disagreement on shared pairs (user types)", show_header=False)
    dis.add_column("what", style="bold")
    dis.add_column("value")
    for key, value in summary["disagreement"].items():
        dis.add_row(key.replace("_", " "), _fmt(value))
    console.print(dis)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)
