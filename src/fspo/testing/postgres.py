"""A throwaway PostgreSQL server for tests and benchmarks (`postgres_cluster`)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fspo.testing.logs import tail

# ---------------------------------------------------------------------------- throwaway PostgreSQL
# A PostgreSQL server of its own: initdb into a new folder under /tmp, listening only on a unix socket
# inside that folder (no TCP port, so it never meets another server, such as the cluster Debian's
# package starts on port 5432), trust authentication (only the folder's owner, and root, can reach the
# socket), deleted at the end. PostgreSQL refuses to run as root: as root, its programs run as the
# `postgres` system user, which then owns the folder.

POSTGRES_BIN_ENV = "FSPO_POSTGRES_BIN"


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: $FSPO_POSTGRES_BIN, else the newest version's under
    /usr/lib/postgresql (Debian, Ubuntu), else the folder of `initdb` on PATH; None without initdb."""
    if given := os.environ.get(POSTGRES_BIN_ENV):
        return Path(given) if (Path(given) / "initdb").is_file() else None
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
    found = max(versions, key=lambda p: int(p.parent.parent.name), default=None) or shutil.which("initdb")
    return Path(found).parent if found else None


def postgres_missing() -> str | None:
    """Why `postgres_cluster` cannot run here, in one line; None when it can."""
    import importlib.util
    import pwd

    if postgres_bin() is None:
        return (
            "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin, on PATH or in "
            f"${POSTGRES_BIN_ENV})"
        )
    if importlib.util.find_spec("psycopg") is None:
        return "the PostgreSQL driver is not installed (pip install 'psycopg[binary]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' system user to run PostgreSQL as"
    return None


@dataclass
class PostgresCluster:
    """A running `postgres_cluster`: its databases are reached over the unix socket in `socket_dir`."""

    socket_dir: Path
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL of `database` (driver psycopg 3, as the superuser postgres)."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"

    def create_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"fspo_{next(self._names)}"
        self._execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of `url` (made by `create_database`), closing connections still open to it."""
        from sqlalchemy.engine import make_url

        self._execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

    def _execute(self, sql: str) -> None:
        import psycopg

        # Outside a transaction: PostgreSQL refuses CREATE/DROP DATABASE inside one.
        with psycopg.connect(
            host=str(self.socket_dir), dbname="postgres", user="postgres", autocommit=True
        ) as c:
            c.execute(sql)


@contextmanager
def postgres_cluster(*, fsync: bool = False) -> Iterator[PostgresCluster]:
    """Start a throwaway PostgreSQL server (see above); stop it and delete its folder on exit.

    `fsync`: flush to disk as a production server does, but with ``synchronous_commit=off`` (a crash of
    the machine may lose the last commits, never corrupt), which is what SQLite's WAL with
    ``synchronous=NORMAL`` (the store's setting) promises: for benchmarks comparing the two. Without it,
    nothing is flushed (``fsync=off``): tests throw the data away anyway.
    """
    if missing := postgres_missing():
        raise RuntimeError(missing)
    root = Path(tempfile.mkdtemp(prefix="fspo-pg-"))  # not pytest's tmp: the `postgres` user must reach it
    data, sock, log = root / "data", root / "socket", root / "server.log"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (root, sock):
            shutil.chown(path, "postgres")
    settings = {"listen_addresses": "''", "unix_socket_directories": f"'{sock}'", "max_connections": "200"}
    settings |= {"synchronous_commit": "off"} if fsync else {"fsync": "off", "full_page_writes": "off"}
    try:
        _postgres("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "-N")
        with open(data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        _postgres("pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start", log=log)
        yield PostgresCluster(sock)
    finally:
        if (data / "postmaster.pid").exists():
            _postgres("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _postgres(program: str, *args: object, log: Path | None = None, check: bool = True) -> None:
    """Run one of PostgreSQL's programs (as the `postgres` user when we are root); a failure raises,
    quoting its own last lines and those of the server's `log`."""
    cmd = [str(postgres_bin() / program), *map(str, args)]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    env = {**os.environ, "LC_ALL": "C"}
    done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()[-3:]
        server = f"; server log: {tail(log, 5)}" if log is not None else ""
        raise RuntimeError(f"{program} failed with status {done.returncode}: {' '.join(said)}{server}")
