"""The `fspo` command: one sub-command per stage, plus `quickstart`.

Each stage owns its typer sub-app in its own package (`fspo/<stage>/cli.py`); this module only
assembles them and turns `UserError`s, and the machine's refusals to write (`write_error`), into one
clear line (exit status 2) instead of a traceback.
"""

from __future__ import annotations

import ast
import errno
import os
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from fspo.core.errors import UserError, write_error

app = typer.Typer(
    name="fspo",
    help="Few-Shot Preference Optimization: personalize an LLM to each user from a few preferences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from fspo.data.cli import app as data_app
    from fspo.eval.cli import register as register_eval
    from fspo.models.cli import app as model_app
    from fspo.quickstart.study import init_cmd
    from fspo.serve.cli import app as serve_app
    from fspo.serve.study_cli import app as study_app
    from fspo.sim.cli import app as sim_app
    from fspo.synth.cli import app as synth_app
    from fspo.train.cli import app as train_app

    app.add_typer(data_app, name="data")
    app.add_typer(sim_app, name="sim")
    app.add_typer(synth_app, name="synth")
    app.add_typer(model_app, name="model")
    app.add_typer(train_app, name="train")
    register_eval(app)  # adds `eval`, `generate`, `report`
    app.add_typer(serve_app, name="serve")
    study_app.command("init")(init_cmd)  # the quickstart's study: serve/ knows no quickstart folders
    app.add_typer(study_app, name="study")


_register()


@app.command()
def quickstart(
    domain: str | None = typer.Option(
        None,
        help="roleplay | reviews | elix: the paper's domain, its unseen users new combinations of traits. "
        "Default: the demo's population (roleplay, one trait per user).",
    ),
    seed: int | None = typer.Option(None, help="Seed of the users, episodes, model and training."),
    shots: int | None = typer.Option(None, min=1, help="Shots per episode (default: the profile's)."),
    config: str | None = typer.Option(
        None, help="A YAML/JSON file of profile fields overriding any (see configs/quickstart/default.yaml)."
    ),
    out: str | None = typer.Option(
        None, help="Folder for every stage's outputs (cached, resumable); default runs/quickstart[-choices]."
    ),
    profile: str = typer.Option("default", help="Size profile: 'default' (~15 min) or 'tiny' (a smoke run)."),
    force: bool = typer.Option(False, help="Ignore cached stage outputs and redo everything."),
    overwrite: bool = typer.Option(
        False, help="Allow another profile than the run in --out (changed stages are redone)."
    ),
) -> None:
    """The whole pipeline on the embedded default model; prints the results table."""
    from fspo.quickstart import default_out, load_profile, run_quickstart

    p = load_profile(profile, domain=domain, config=config, seed=seed, shots=shots)
    out = out or default_out(domain, seed, shots, config)
    run_quickstart(out=out, profile=p, force=force, overwrite=overwrite)


@app.command()
def paper(
    domains: str = typer.Option("roleplay,reviews,elix", help="Comma-separated domains."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; results are the mean over them."),
    out: str = typer.Option("runs/paper", help="Folder of the runs (<domain>-seed<N>) and report/."),
    profile: str = typer.Option("default", help="Size profile: 'default' or 'tiny' (a smoke run)."),
    config: str | None = typer.Option(
        None, help="YAML/JSON file of profile fields over every domain's profile (e.g. model_size)."
    ),
    overwrite: bool = typer.Option(False, help="Allow runs in --out made with another profile."),
) -> None:
    """Every paper domain over several seeds (resumable): one report beside the paper's tables."""
    from fspo.paper import print_summary, run_paper

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    domain_list = [d.strip() for d in domains.split(",") if d.strip()]
    result = run_paper(out, domain_list, seed_list, profile=profile, config=config, overwrite=overwrite)
    print_summary(result)


def _fail(message: str) -> NoReturn:
    # The message is user text (paths, field values): escaped, so brackets in it are not read as markup.
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True
    )
    sys.exit(2)


def main() -> None:
    from fspo.core import outputs

    outputs.interrupted.clear()
    try:
        app()
    except SystemExit:
        # Ctrl-C: typer exits with status 130, printing nothing; say what the stopped run left and what
        # to rerun (each `OutputFolder` notes it).
        if outputs.interrupted:
            for note in outputs.interrupted:
                Console(stderr=True, soft_wrap=True).print(
                    f"[yellow]interrupted:[/] {escape(note)}", highlight=False
                )
            sys.exit(130)
        raise
    except UserError as err:
        _fail(str(err))
    except Exception as err:
        # A path that cannot be opened or written (--out /proc/x, a folder given as a file, a full disk,
        # a read-only mount, a symlink loop) is the user's or the machine's, said in one line with the
        # path and the cause, whichever library met it; anything else is a bug and keeps its traceback.
        fault = write_error(_symlink_loop(err) or err)
        if fault is None:
            raise
        _fail(str(fault))


def _symlink_loop(err: Exception) -> OSError | None:
    """Python < 3.13's `Path.resolve` says a symlink loop as a RuntimeError: the OSError(ELOOP) it is."""
    prefix = "Symlink loop from "
    if not isinstance(err, RuntimeError) or not str(err).startswith(prefix):
        return None
    return OSError(errno.ELOOP, os.strerror(errno.ELOOP), ast.literal_eval(str(err).removeprefix(prefix)))
