"""The `fspo train` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="train stage", no_args_is_help=True)
