"""The store's database: one SQLAlchemy engine, its sessions, and the schema brought to alembic's head.

SQLite (a file) is the default and the main case; any other SQLAlchemy URL (PostgreSQL) works too,
since the queries are plain ORM/Core with no SQLite-only SQL. The schema is versioned with alembic
(``fspo/serve/migrations``); opening a database upgrades it to head, inside one transaction, so a
database made by an older fspo is brought up to date and two processes opening a new file at once
cannot both create it.

SQLite needs care to be a good server database, set on every connection:
- WAL journal: readers never block the writer and the writer never blocks readers.
- ``busy_timeout``: a writer that finds the write lock taken waits for it instead of failing at once
  with "database is locked".
- ``foreign_keys=ON``: SQLite ignores foreign keys unless asked, per connection.
- Writes start with ``BEGIN IMMEDIATE`` (the write lock is taken when the transaction starts, where
  the busy timeout applies), not the driver's deferred BEGIN, which upgrades a read lock to a write
  lock mid-transaction and fails with SQLITE_BUSY, no waiting, when another writer got there first.
  This is SQLAlchemy's documented recipe: the driver's own transaction handling is turned off
  (``isolation_level = None``) and the engine's "begin" event emits the BEGIN itself. Reads use a
  plain (deferred) BEGIN: under WAL they see one consistent snapshot and never wait.

Every store method is one transaction in a `Session` of its own (`Database._session`), so a store is
safe to share between threads (the app calls it from a threadpool).

A database fspo did not make is never changed: before the engine's first connection (which would switch
a SQLite file to WAL), `check_ours` looks at the existing schema through a read-only connection and
refuses a SQLite file holding another application's tables, or an alembic revision fspo does not know.
A SQLite database that needs migrating (new, or made by an older fspo) is upgraded under an exclusive
`flock` on its folder, so a second process opening it meanwhile waits for the migration, however long,
instead of failing when SQLite's busy timeout runs out (no lock file is left behind; the kernel drops
the lock when its process dies). A database already at head takes no lock. A PostgreSQL database has
no folder to lock: there the migration's transaction takes an advisory lock first (`_server_lock`),
with the same effect. Other server databases have neither: two first opens there can still race to
create the schema, and one fails.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, StaticPool

from fspo.core.errors import UserError

MIGRATIONS = Path(__file__).parent.parent / "migrations"
T = TypeVar("T")
SQLITE_MAGIC = b"SQLite format 3\x00"
VERSION_TABLE = "alembic_version"
MIGRATION_WAIT_S = 120.0  # how long an opener waits for another process's migration before giving up
MIGRATION_LOCK = 0x6673706F  # PostgreSQL's advisory lock of fspo's migrations: "fspo" in ASCII


def parse_url(url: str) -> URL:
    """`url` as a SQLAlchemy URL; a `UserError` naming --db when it is not one (the one place saying so)."""
    try:
        return make_url(url)
    except Exception as e:  # sqlalchemy's ArgumentError, or a non-string
        raise UserError(f"--db: {url!r} is not a database URL (e.g. sqlite:///fspo-serve.db): {e}") from None


def shown_url(url: str) -> str:
    """`url` fit to print or write to a report: its password, if any, masked."""
    return parse_url(url).render_as_string(hide_password=True)


def migration_config(connection: Any):
    """An alembic `Config` for fspo's migrations that runs them on `connection` (no alembic.ini).

    Also the way to make a new revision: ``alembic.command.revision(migration_config(conn),
    message=..., autogenerate=True)`` with a connection to a database at head.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(migration_config(None)).get_current_head()


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {rev.revision for rev in ScriptDirectory.from_config(migration_config(None)).walk_revisions()}


def check_ours(conn: Connection, shown: str, *, whole: bool) -> str | None:
    """The alembic revision of fspo's schema in the database behind `conn` (None: not there yet), or a
    `UserError` naming --db `shown` when the tables there are not fspo's: a revision fspo does not know
    (another application's alembic, or a newer fspo's), tables named like fspo's without its revision,
    or, with `whole` (a SQLite file is one application's), any table fspo does not make. A server
    database (PostgreSQL) is often shared, so other tables there are left alone, not refused.

    A later revision that drops or renames a table must keep accepting the old name here (as one of
    ours), or a database made before it would be refused instead of migrated.
    """
    from alembic.migration import MigrationContext

    from fspo.serve.store.tables import Base

    tables = set(inspect(conn).get_table_names())
    ours = set(Base.metadata.tables)
    foreign = sorted(tables - ours - {VERSION_TABLE}) if whole else []
    lookalikes = sorted(tables & ours) if VERSION_TABLE not in tables else []
    if foreign or lookalikes:
        named = _names(foreign or lookalikes)
        what = "tables fspo did not make" if foreign else "tables named like fspo's but no alembic_version"
        raise UserError(
            f"--db {shown}: the database holds {what} ({named}); it belongs to another application and "
            "is left unchanged: give fspo a database of its own"
        )
    if VERSION_TABLE not in tables:
        return None
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision not in known_revisions():
        raise UserError(
            f"--db {shown}: its schema is at revision {revision!r}, which this fspo does not know (a newer "
            "fspo's database, or another application's); it is left unchanged"
        )
    return revision


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _sqlite_revision(file: Path, shown: str) -> str | None:
    """`check_ours` for an existing SQLite `file`, read through a connection that cannot write: the
    engine's own first connection would already switch the file to WAL.

    A WAL-mode file without its ``-wal`` file (closed cleanly: everything is in the main file) is read
    as immutable, since a read-only connection to it would create the ``-wal`` and ``-shm`` files.
    """
    try:
        with open(file, "rb") as f:
            header = f.read(100)
    except OSError as err:
        raise UserError(f"--db {shown}: cannot read {file}: {err.strerror}") from None
    if not header:
        return None  # an empty file is a new database
    if not header.startswith(SQLITE_MAGIC):
        raise UserError(f"--db {shown}: {file} is not a SQLite database; it is left unchanged")
    wal_mode = len(header) > 18 and header[18] == 2
    uri = file.resolve().as_uri() + "?mode=ro"
    if wal_mode and not Path(f"{file}-wal").exists():
        uri += "&immutable=1"
    look = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=NullPool)
    try:
        with look.connect() as conn:
            return check_ours(conn, shown, whole=True)
    finally:
        look.dispose()


@contextmanager
def _folder_lock(folder: Path, shown: str) -> Iterator[None]:
    """An exclusive `flock` on `folder` (see the module docstring), waited for up to `MIGRATION_WAIT_S`;
    nothing on a file system without locks or a folder that cannot be opened, where SQLite's write lock
    still keeps migrations apart (up to its busy timeout)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + MIGRATION_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    break
                if time.monotonic() > deadline:
                    raise UserError(
                        f"--db {shown}: waited {MIGRATION_WAIT_S:.0f} s for the lock on the folder {folder}, "
                        "which another process holds (fspo migrating a database there, or writing an --out "
                        "there); try again when it is done"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _server_lock(conn: Connection) -> None:
    """On PostgreSQL, wait (up to `MIGRATION_WAIT_S`) for the advisory lock that keeps migrations of one
    database apart, held until the transaction ends, even when its process dies. A second opener gets it
    once the first's schema is committed; alembic, reading the revision after it, then finds head and
    changes nothing. Transactional DDL makes the wait safe: the first's tables appear all at once."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL lock_timeout = '{int(MIGRATION_WAIT_S)}s'"))
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK})


class Database:
    """An engine set up as the module docstring says, with the schema at head once constructed."""

    def __init__(
        self, url: str = "sqlite:///fspo-serve.db", *, busy_timeout_ms: int = 5000, echo: bool = False
    ):
        self.url = url
        parsed = parse_url(url)
        sqlite = parsed.get_backend_name() == "sqlite"
        memory = sqlite and parsed.database in (None, "", ":memory:")
        kwargs: dict[str, Any] = {"echo": echo}
        if sqlite:
            # Pooled connections move between threads; the pool, not sqlite3, guards their use.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
            if memory:
                kwargs["poolclass"] = StaticPool  # one connection: each new one would be a new, empty DB
        self._engine: Engine = create_engine(url, **kwargs)
        # An in-memory database is one shared connection, which cannot hold two transactions at once.
        self._lock = threading.RLock() if memory else nullcontext()
        if sqlite:
            _sqlite_events(self._engine, busy_timeout_ms)
        self._writer = self._engine.execution_options(fspo_write=True)
        self._upgrade(Path(parsed.database) if sqlite and not memory else None)

    def _upgrade(self, file: Path | None) -> None:
        """Bring the schema to head (see the module docstring); `file`: the SQLite file, if any."""
        from alembic import command

        shown = shown_url(self.url)
        if file is not None:
            revision = _sqlite_revision(file, shown) if file.exists() else None
        elif self._engine.dialect.name != "sqlite":
            with self._engine.connect() as conn:  # no pragmas off SQLite: looking writes nothing
                revision = check_ours(conn, shown, whole=False)
        else:
            revision = None  # in memory: always new
        if revision == head_revision():
            return
        lock = _folder_lock(file.resolve().parent, shown) if file is not None else nullcontext()
        with lock, self._lock, self._writer.begin() as conn:
            _server_lock(conn)
            command.upgrade(migration_config(conn), "head")

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        with (
            self._lock,
            Session(self._writer if write else self._engine, expire_on_commit=False) as s,
            s.begin(),
        ):
            yield s

    def _write_creating_user(self, write: Callable[[Session], T]) -> T:
        """`write` in a write transaction, run once more if it lost a race to create the same new user.

        Off SQLite, BEGIN IMMEDIATE does not serialize writers: another may insert the user between
        our read and our insert, and ours fails on the primary key (IntegrityError). The user exists
        then, so the second run finds it.
        """
        try:
            with self._session(write=True) as s:
                return write(s)
        except IntegrityError:
            with self._session(write=True) as s:
                return write(s)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({shown_url(self.url)!r})"


def _sqlite_events(engine: Engine, busy_timeout_ms: int) -> None:
    """Per-connection pragmas and SQLAlchemy's pysqlite transaction recipe (see the module docstring)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own BEGIN handling off: SQLAlchemy emits BEGIN / BEGIN IMMEDIATE below.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")  # an in-memory database stays "memory"
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")  # durable across crashes of the process under WAL
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("fspo_write") else "BEGIN")
