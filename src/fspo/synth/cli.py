"""The `fspo synth` sub-commands: `run` a config (resumable), `stats` on its output."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fspo.core.errors import UserError

app = typer.Typer(help="Synthetic users and preferences made with an LLM (resumable).", no_args_is_help=True)


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML config (see configs/synth/ and docs/synth.md)."),
    out: str | None = typer.Option(None, help="Output folder (default: the config's `out`)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    overwrite: bool = typer.Option(
        False, help="Allow other settings than the run in --out (changed stages are redone from the cache)."
    ),
) -> None:
    """Run every stage, or resume where the last run stopped (also after kill -9)."""
    from fspo.llm import BackendUnavailable
    from fspo.synth.config import load_config
    from fspo.synth.pipeline import run_pipeline

    cfg = load_config(config)
    try:
        result = run_pipeline(cfg, out=out, progress=progress, config_path=config, overwrite=overwrite)
    except BackendUnavailable as err:
        raise UserError(f"backend ({cfg.backend.resolved_base_url() or cfg.backend.kind}): {err}") from err
    console = Console()
    exp = result["stages"].get("export", {})
    c = result["client"]
    console.print(
        f"[bold]{cfg.name}[/]: {exp.get('users', 0)} users, {exp.get('preferences', 0)} preferences in "
        f"{result['out']}  (this run: {c['sent']} requests sent, {c['cache_hits']} from cache, "
        f"{sum(c['retries'].values())} retries, {c['reasks']} re-asks, {c['parse_failures']} unparsable, "
        f"cost {c['cost']})"
    )


@app.command()
def stats(
    folder: Path = typer.Argument(..., help="Output folder of `fspo synth run`."),
    embedding_model: str | None = typer.Option(None, help="HF encoder folder for embedding spread."),
    max_users: int = typer.Option(12, help="Users shown in the disagreement matrix."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Diversity, label consistency, per-user agreement and the users' disagreement matrix."""
    from fspo.core.files import atomic_write_json
    from fspo.synth.stats import synth_stats

    result = synth_stats(folder, embedding_model, max_users)
    atomic_write_json(folder / "stats.json", result)
    if as_json:
        print(json.dumps(result))
        return
    console = Console()
    div = Table(title="diversity")
    for col in ("texts", "count", "distinct-1", "distinct-2", "distinct-3", "embedding spread"):
        div.add_column(col)
    for name, d in result["diversity"].items():
        spread = d.get("embedding_spread")
        div.add_row(
            name,
            str(d["count"]),
            *(f"{d[f'distinct_{n}']:.3f}" for n in (1, 2, 3)),
            "-" if spread is None else f"{spread:.3f}",
        )
    console.print(div)
    cons = result["consistency"]
    console.print(
        f"labels: {result['labels']}  consistency: {'-' if cons is None else f'{cons:.1%}'}  "
        f"pairs shared by 2+ users: {result['shared_pairs']}"
    )
    users = Table(title="per user")
    for col in ("user", "labels", "consistency", "agreement with majority", "pairs compared"):
        users.add_column(col)
    for u, d in list(result["per_user"].items())[:max_users]:
        users.add_row(
            u,
            str(d["labels"]),
            _pct(d["consistency"]),
            _pct(d["agreement_with_majority"]),
            str(d["pairs_compared"]),
        )
    console.print(users)
    m = result["disagreement_matrix"]
    mat = Table(title="disagreement between users (share of common pairs)")
    mat.add_column("")
    for k in range(len(m["users"])):
        mat.add_column(str(k))
    for k, (u, row) in enumerate(zip(m["users"], m["values"], strict=True)):
        mat.add_row(f"{k} {u}", *("-" if v is None else f"{v:.2f}" for v in row))
    console.print(mat)
    console.print(f"written to {folder / 'stats.json'}")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"
