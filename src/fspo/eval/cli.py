"""The `fspo eval`, `fspo generate` and `fspo report` commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    eval_app = typer.Typer(help="Evaluate: preference accuracy, win rates.", no_args_is_help=True)
    app.add_typer(eval_app, name="eval")
