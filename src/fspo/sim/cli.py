"""The `fspo sim` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="sim stage", no_args_is_help=True)
