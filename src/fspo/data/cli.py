"""The `fspo data` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="data stage", no_args_is_help=True)
