"""The `fspo synth` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="synth stage", no_args_is_help=True)
