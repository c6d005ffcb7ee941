"""The `fspo models` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="models stage", no_args_is_help=True)
