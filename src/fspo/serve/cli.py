"""The `fspo serve` command: run the personalized API (and the page), manage keys, move preferences.

``fspo serve --model DIR`` serves one trained model as the system ``fspo`` (plus any
``--baseline NAME=DIR[:SHOTS]``) on 127.0.0.1. Its sub-commands work on the same database without a
server: ``keys create|list|revoke``, ``import`` and ``export`` (preferences in the project's record
formats, so what people labelled can become training data).

``--workers N`` serves from N processes behind the one port (uvicorn's workers, each building the app
from the command's options: `ServeOptions`, `worker_app`).

Heavy imports (torch, FastAPI, SQLAlchemy) happen inside the commands, so `fspo --help` stays fast.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

from fspo.core.errors import UserError
from fspo.infer.generate import Decoding

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fspo.serve.answerers import Answerer, System
    from fspo.serve.store import Store
    from fspo.serve.study import StudyConfig

DEFAULT_DB = "sqlite:///fspo-serve.db"

app = typer.Typer(
    help="Serve a model over an OpenAI-compatible API personalized by each user's preferences; manage keys.",
    invoke_without_command=True,
)
keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console(soft_wrap=True)

DB_HELP = "The database: a SQLAlchemy URL (sqlite:///FILE, postgresql://...)."
_DECODING = Decoding.model_fields  # the decoding options' defaults and help live in `Decoding`


def open_store(db: str, *, create: bool = True) -> Store:
    """The store at `db`; any failure to open it is a `UserError` naming --db.

    With ``create=False`` a missing SQLite file is an error rather than a new empty database
    (listing or exporting from a mistyped path should say so, not print nothing).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from fspo.serve.store import Store, parse_url

    url = parse_url(db)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        file = Path(url.database)
        if not create and not file.is_file():
            raise UserError(f"--db: no database file {str(file)!r}")
        if not file.parent.is_dir():
            raise UserError(f"--db: folder {str(file.parent)!r} does not exist")
    try:
        return Store(db)
    except (SQLAlchemyError, ImportError) as err:  # no driver for the URL, server unreachable, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--db: cannot open {url.render_as_string(hide_password=True)!r}: {first}") from None


@dataclass(frozen=True)
class BaselineSpec:
    name: str
    model: Path
    shots: int | None


def parse_baseline(spec: str) -> BaselineSpec:
    """``NAME=DIR[:SHOTS]`` (e.g. ``base=runs/q/base/model:0`` for a zero-shot baseline).

    Without SHOTS the baseline takes as many shots as the served model (--shots).
    """
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise UserError(f"--baseline {spec!r}: expected NAME=DIR[:SHOTS]")
    folder, colon, shots = rest.rpartition(":")
    if not colon:
        return BaselineSpec(name.strip(), Path(rest), None)
    if not shots.isdigit() or not folder:
        raise UserError(f"--baseline {spec!r}: SHOTS must be a whole number >= 0, not {shots!r}")
    return BaselineSpec(name.strip(), Path(folder), int(shots))


def _model_folder(option: str, path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"{option}: no model folder {str(path)!r}")
    if not (path / "config.json").is_file():
        raise UserError(f"{option}: {str(path)!r} has no config.json (not a saved model folder)")
    return path


def build_systems(
    model: Path,
    *,
    name: str = "fspo",
    shots: int = 8,
    baselines: list[str] | None = None,
    backend: str = "local",
    backend_url: str | None = None,
    backend_model: str | None = None,
    backend_key: str | None = None,
    cache_mb: int = 256,
    ranked: bool = True,
) -> list[System]:
    """The served systems: `model` as `name`, then each baseline; one answerer per distinct folder
    (`backend` says where the main model runs: in this process, or on a vLLM server). `ranked`: they
    answer best_of, each in-process model against its training reference (systems trained from one
    model share it)."""
    from fspo.serve.answerers import System, local_answerer, remote_answerer
    from fspo.serve.references import ServedReference

    specs = [parse_baseline(b) for b in baselines or []]
    names = [name, *(s.name for s in specs)]
    if len(set(names)) != len(names):
        raise UserError(f"--baseline: system names must be distinct, got {', '.join(names)}")
    if backend not in ("local", "vllm"):
        raise UserError(f"--backend: {backend!r} is not one of local, vllm")
    if backend == "vllm" and not (backend_url and backend_model):
        raise UserError("--backend vllm needs --backend-url URL and --backend-model NAME")
    main = _model_folder("--model", model).resolve()
    folders = [main, *(_model_folder(f"--baseline {s.name}", s.model).resolve() for s in specs)]
    answerers: dict[Path, Answerer] = {}
    references: dict[Any, ServedReference] = {}

    def load(folder: Path) -> Answerer:
        # A baseline that is the same folder (e.g. FSPO's model with 0 shots) shares its answerer.
        if folder not in answerers:
            if backend == "vllm" and folder == main:
                answerers[folder] = remote_answerer(
                    backend_url,
                    folder,
                    remote_model=backend_model,
                    api_key=backend_key,  # type: ignore[arg-type]
                )
            else:
                ref = ServedReference.of(folder, references) if ranked else ServedReference()
                answerers[folder] = local_answerer(folder, cache_bytes=cache_mb << 20, reference=ref)
        return answerers[folder]

    systems = [System(name, load(main), shots=shots)]
    for spec, folder in zip(specs, folders[1:], strict=True):
        systems.append(System(spec.name, load(folder), shots=shots if spec.shots is None else spec.shots))
    return systems


def _decoding(backend: str, repetition_penalty: float, no_repeat_ngram_size: int) -> Decoding:
    """The server's decoding (a `UserError` naming the field of a bad value). A remote backend has none
    of its own: vLLM's penalty counts the prompt too and it has no n-gram rule."""
    decoding = Decoding.of(
        "fspo serve", repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size
    )
    if backend == "vllm" and decoding != Decoding():
        raise UserError("--repetition-penalty, --no-repeat-ngram-size: not available with --backend vllm")
    return decoding


WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def allowed_hosts(host: str, given: list[str]) -> list[str]:
    """The Host names the server answers (`fspo.serve.middleware.HostCheck`): `given`, else the loopback
    names and `host`. Listening on every address (``--host 0.0.0.0``) without naming them is refused:
    the server cannot know by which names people reach it, and answering any name is what DNS
    rebinding needs."""
    from fspo.serve.middleware import LOOPBACK_HOSTS

    if given:
        return given
    if host in WILDCARD_ADDRESSES:
        raise UserError(
            f"serve: --host {host!r} listens on every address; name the hosts people reach the server "
            "by with --allowed-host NAME (repeatable, or '*' for any)"
        )
    return [*LOOPBACK_HOSTS, host.strip("[]")]


class ServeOptions(BaseModel):
    """What `fspo serve` builds its app from: the command's options, less --host, --port and --workers.

    With --workers N, uvicorn starts each worker as a fresh process that imports its app by name
    (`worker_app`), so the options travel to the workers as this model's JSON in an environment variable
    (`WORKER_ENV`; only processes of the same user can read it, which matters for `backend_key`).
    `error_dir`: where a worker that cannot start writes why, for the command to say it.
    """

    model_config = ConfigDict(frozen=True)

    model: Path
    db: str
    name: str
    shots: int
    baselines: list[str]
    study: Path | None
    backend: str
    backend_url: str | None
    backend_model: str | None
    backend_key: str | None
    cache_mb: int
    repetition_penalty: float
    no_repeat_ngram_size: int
    max_samples: int | None
    allowed_hosts: list[str]
    error_dir: Path | None = None

    def system_names(self) -> list[str]:
        return [self.name, *(parse_baseline(b).name for b in self.baselines)]


WORKER_ENV = "FSPO_SERVE_WORKER"
# How long uvicorn's supervisor waits for a worker's answer to its health check before killing it as
# hung. Its default (5 s) can pass while a worker loads a model and the machine is busy, and a worker
# killed while starting is started again, and again.
WORKER_HEALTHCHECK_S = 60


def build_app(options: ServeOptions) -> tuple[FastAPI, Store, StudyConfig | None]:
    """The app `options` describe, over its store, which the caller closes; the study, if any."""
    from fspo.serve.app import create_app
    from fspo.serve.serving import Limits

    decoding = _decoding(options.backend, options.repetition_penalty, options.no_repeat_ngram_size)
    limits = Limits() if options.max_samples is None else Limits(max_samples=options.max_samples)
    study = _study(options.study)
    systems = build_systems(
        options.model,
        name=options.name,
        shots=options.shots,
        baselines=options.baselines,
        backend=options.backend,
        backend_url=options.backend_url,
        backend_model=options.backend_model,
        backend_key=options.backend_key,
        cache_mb=options.cache_mb,
        ranked=limits.max_samples > 1,
    )
    store = open_store(options.db)
    try:
        api = create_app(
            store, systems, study=study, limits=limits, decoding=decoding, allowed_hosts=options.allowed_hosts
        )
        return api, store, study
    except BaseException:
        store.close()
        raise


def _study(path: Path | None) -> StudyConfig | None:
    if path is None:
        return None
    from fspo.serve.study import StudyConfig

    return StudyConfig.load(path)


def _banner(store: Store, options: ServeOptions, study: StudyConfig | None, url: str, workers: int) -> None:
    from fspo.serve.store import shown_url

    processes = f", {workers} worker processes" if workers > 1 else ""
    systems = ", ".join(options.system_names())
    console.print(f"fspo serve: {url}  (systems: {systems}{processes})", highlight=False)
    console.print(f"  database: {store!r}", highlight=False)
    if study is not None:
        console.print(f"  study: sign-in code [bold]{study.code}[/] at {url}/", highlight=False)
    keys = store.keys()  # noqa: SIM118 - Store.keys is a query of API keys, not a dict's keys
    if not any(k.scope == "user" and k.revoked_at is None for k in keys):
        hint = f"fspo serve keys create --user NAME --db {shown_url(options.db)}"
        console.print(f"  no user keys yet: {hint}", highlight=False)


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    model: Path | None = typer.Option(None, help="The model folder to serve (as `fspo train` saves it)."),
    db: str = typer.Option(DEFAULT_DB, help=DB_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, min=0, max=65535),
    workers: int = typer.Option(
        1,
        min=1,
        help="Worker processes behind the one port, each with the model and its own prefix cache "
        "(connections are not sticky by user: see docs/serve.md, Scale-out).",
    ),
    name: str = typer.Option("fspo", help="The served name of --model (the `model` field of requests)."),
    shots: int = typer.Option(
        8, min=0, help="At most this many of the caller's newest preferences as shots."
    ),
    baseline: list[str] = typer.Option(
        [], help="Another system, NAME=DIR[:SHOTS] (SHOTS 0: no personalization); repeatable."
    ),
    study: Path | None = typer.Option(None, help="A study file (YAML/JSON): enables the blind study."),
    backend: str = typer.Option("local", help="local (in-process) or vllm (an OpenAI-compatible server)."),
    backend_url: str | None = typer.Option(
        None, help="--backend vllm: its base URL, e.g. http://host:8001/v1."
    ),
    backend_model: str | None = typer.Option(None, help="--backend vllm: the model name it serves."),
    backend_key: str | None = typer.Option(
        None, envvar="FSPO_BACKEND_API_KEY", help="--backend vllm: its key."
    ),
    cache_mb: int = typer.Option(256, min=0, help="Per-user prefix cache size in MiB (0: off)."),
    repetition_penalty: float = typer.Option(
        _DECODING["repetition_penalty"].default, help=_DECODING["repetition_penalty"].description
    ),
    no_repeat_ngram_size: int = typer.Option(
        _DECODING["no_repeat_ngram_size"].default, help=_DECODING["no_repeat_ngram_size"].description
    ),
    max_samples: int | None = typer.Option(
        None, min=1, help="At most this many samples a request (n, best_of); default 16, 1: one answer."
    ),
    allowed_host: list[str] = typer.Option(
        [],
        help="A name requests may give as Host (repeatable; '*.example.org' for subdomains, '*' for any). "
        "Default: loopback names and --host.",
    ),
) -> None:
    """Serve --model (and baselines) until interrupted; sub-commands manage keys and preferences."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        raise UserError("serve: --model DIR is required (or use a sub-command: keys, import, export)")
    import uvicorn

    options = ServeOptions(
        model=model,
        db=db,
        name=name,
        shots=shots,
        baselines=baseline,
        study=study,
        backend=backend,
        backend_url=backend_url,
        backend_model=backend_model,
        backend_key=backend_key,
        cache_mb=cache_mb,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        max_samples=max_samples,
        allowed_hosts=allowed_hosts(host, allowed_host),
    )
    if workers > 1:
        _serve_workers(options, host, port, workers)
        return
    api, store, study_config = build_app(options)
    try:
        _banner(store, options, study_config, f"http://{host}:{port}", workers)
        uvicorn.run(api, host=host, port=port, log_level="info")
    finally:
        store.close()


def _serve_workers(options: ServeOptions, host: str, port: int, workers: int) -> None:
    """`workers` uvicorn worker processes behind one port, each building the app from `options`.

    What can be checked without loading a model is checked here first, before any worker starts: the
    decoding, the study file, the database (which this process also migrates, once). What only
    loading finds (a model folder, a reference), a worker writes to the error folder before it exits;
    uvicorn then stops the others, and this raises the first message, as one process would have.
    """
    import uvicorn

    _decoding(options.backend, options.repetition_penalty, options.no_repeat_ngram_size)
    study = _study(options.study)
    with open_store(options.db) as store:
        _banner(store, options, study, f"http://{host}:{port}", workers)
    with tempfile.TemporaryDirectory(prefix="fspo-serve-") as errors:
        os.environ[WORKER_ENV] = options.model_copy(update={"error_dir": Path(errors)}).model_dump_json()
        try:
            uvicorn.run(
                "fspo.serve.cli:worker_app",
                factory=True,
                workers=workers,
                host=host,
                port=port,
                log_level="info",
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
            )
        finally:
            del os.environ[WORKER_ENV]
        if failed := sorted(Path(errors).iterdir()):
            raise UserError(failed[0].read_text())


def worker_app() -> FastAPI:
    """The app of one worker of ``fspo serve --workers N``: uvicorn calls this in each worker process.

    A worker that cannot build it writes why to the error folder and exits with uvicorn's
    STARTUP_FAILURE status, on which uvicorn stops all workers instead of starting this one again and
    again (it restarts a worker that dies of anything else).
    """
    from uvicorn.config import STARTUP_FAILURE

    options = ServeOptions.model_validate_json(os.environ[WORKER_ENV])
    try:
        api, store, _ = build_app(options)
    except Exception as err:
        if isinstance(err, UserError):
            message = str(err)
        else:
            traceback.print_exc()
            message = f"serve: a worker failed to start: {type(err).__name__}: {err}"
        if options.error_dir is not None:
            (options.error_dir / f"worker-{os.getpid()}.txt").write_text(message)
        sys.exit(STARTUP_FAILURE)
    atexit.register(store.close)  # a worker ends when uvicorn stops it: its connections close then
    return api


@keys_app.command("create")
def keys_create(
    user: str = typer.Option(..., help="The user the key acts as (created if new)."),
    admin: bool = typer.Option(False, "--admin", help="An admin key (only /v1/admin/* routes)."),
    name: str = typer.Option("", help="A label for the key (who or what holds it)."),
    db: str = typer.Option(DEFAULT_DB, help=DB_HELP),
) -> None:
    """Create a key and print it; it is stored hashed, so this is the only time it is shown."""
    with open_store(db) as store:
        info, key = store.create_key(user, scope="admin" if admin else "user", name=name)
    console.print(key, highlight=False)
    Console(stderr=True).print(f"key {info.id} ({info.scope}) for user {info.user_id!r}: shown once, keep it")


@keys_app.command("list")
def keys_list(
    user: str | None = typer.Option(None, help="Only this user's keys."),
    db: str = typer.Option(DEFAULT_DB, help=DB_HELP),
) -> None:
    """The keys (never their secrets): id, user, scope, name, created, revoked."""
    with open_store(db, create=False) as store:
        keys = store.keys(user)
    table = Table("id", "user", "scope", "name", "created", "revoked")
    for k in keys:
        revoked = k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else ""
        table.add_row(k.id, k.user_id, k.scope, k.name, k.created_at.isoformat(timespec="seconds"), revoked)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="The key's id (the part after 'fspo-', as `keys list` shows)."),
    db: str = typer.Option(DEFAULT_DB, help=DB_HELP),
) -> None:
    """Revoke a key: it fails authentication from now on."""
    with open_store(db, create=False) as store:
        if not store.revoke_key(key_id):
            raise UserError(f"keys revoke: no active key {key_id!r}")
    console.print(f"revoked key {key_id}")


@app.command("import")
def import_(
    path: Path = typer.Argument(
        ..., help="Preference records (.jsonl/.json/.parquet), or a data folder (preferences + users)."
    ),
    users: Path | None = typer.Option(None, help="User records to import too (descriptions, metadata)."),
    source: str = typer.Option("import", help="Recorded as each preference's source."),
    db: str = typer.Option(DEFAULT_DB, help=DB_HELP),
    on_duplicate: str = typer.Option(
        "error",
        "--on-duplicate",
        help="Records that conflict (one user id twice with other content, or one preference with its "
        "label swapped): error, or keep the first or the last of each. An exact repeat is kept once.",
    ),
) -> None:
    """Import preferences (each with its own user, created if new) in the project's record formats."""
    from fspo.data.io import read_dataset_dir, read_unique_records
    from fspo.data.schema import Preference, User
    from fspo.serve.store import shown_url

    user_records: list[Any] = []
    if path.is_dir():
        prefs, user_records, reports = read_dataset_dir(path, on_duplicate=on_duplicate)
    else:
        if not path.is_file():
            raise UserError(f"import: no such file or folder {str(path)!r}")
        prefs, report = read_unique_records(path, Preference, on_duplicate)
        reports = [report]
    if users is not None:
        more, report = read_unique_records(users, User, on_duplicate, allow_empty=True)
        user_records += more
        reports.append(report)
    notes = Console(stderr=True, soft_wrap=True)
    dropped = [line for rep in reports for line in rep.dropped]
    for line in dropped[:20] + ([f"... and {len(dropped) - 20} more"] if len(dropped) > 20 else []):
        notes.print(f"note: {line}", highlight=False, markup=False)
    with open_store(db) as store:
        n_users = store.import_users(user_records) if user_records else 0
        n_prefs = store.import_preferences(prefs, source=source)
    console.print(
        f"imported {n_prefs} preferences and {n_users} user records into {shown_url(db)}", highlight=False
    )


@app.command("export")
def export(
    out: Path = typer.Option(..., help="The preferences file to write (.jsonl, .json or .parquet)."),
    user: str | None = typer.Option(None, help="Only this user's preferences."),
    db: str = typer.Option(DEFAULT_DB, help=DB_HELP),
) -> None:
    """Write the stored preferences as `Preference` records (training data from real people)."""
    from fspo.data.io import write_records
    from fspo.data.schema import Preference

    with open_store(db, create=False) as store:
        prefs = store.export_preferences(user)
    n = write_records(out, prefs, Preference)
    console.print(f"wrote {n} preferences to {out}", highlight=False)
