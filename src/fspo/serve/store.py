"""The preference store of `fspo serve`: users, their API keys, their preferences, study trials, events.

One `Store` wraps one SQLAlchemy engine. SQLite (a file) is the default and the main case; any other
SQLAlchemy URL (PostgreSQL) works too, since the queries are plain ORM/Core with no SQLite-only SQL.
The schema is versioned with alembic (``fspo/serve/migrations``); opening a store upgrades it to head,
inside one transaction, so a database made by an older fspo is brought up to date and two processes
opening a new file at once cannot both create it.

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

Every method is one transaction in a `Session` of its own, so a `Store` is safe to share between
threads (the app calls it from a threadpool). Every write appends one `Event` in the same transaction,
so the log and the data can never disagree.

Identity: the caller's user id comes from its API key (`authenticate`); every preference method takes
that user id and touches only that user's rows (the WHERE clause carries it; nothing is filtered in
Python afterwards). Keys are shown once as ``fspo-<key id>-<secret>``; only sha256(secret) is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from fspo.core.errors import DataError, UserError
from fspo.data.schema import Preference, User

Scope = Literal["user", "admin"]
Vote = Literal["left", "right", "tie"]
SCOPES: tuple[str, ...] = ("user", "admin")
VOTES: tuple[str, ...] = ("left", "right", "tie")
MIGRATIONS = Path(__file__).parent / "migrations"
KEY_PREFIX = "fspo"
_KEY_RE = re.compile(r"fspo-([0-9a-f]{16})-([A-Za-z0-9_-]{20,128})")
T = TypeVar("T")


def parse_url(url: str) -> URL:
    """`url` as a SQLAlchemy URL; a `UserError` naming --db when it is not one (the one place saying so)."""
    try:
        return make_url(url)
    except Exception as e:  # sqlalchemy's ArgumentError, or a non-string
        raise UserError(f"--db: {url!r} is not a database URL (e.g. sqlite:///fspo-serve.db): {e}") from None


def shown_url(url: str) -> str:
    """`url` fit to print or write to a report: its password, if any, masked."""
    return parse_url(url).render_as_string(hide_password=True)


def storable(value: Any) -> Any:
    """`value` unchanged if every database stores it faithfully, else a `ValueError` saying where not.

    Two things are refused: a NUL character in a string (PostgreSQL's text and JSON types reject it:
    the insert would fail) and a non-finite float, NaN or Infinity, anywhere in a JSON value (JSON has
    none: the JSON column would silently store null, or fail).
    """
    _check_storable(value, "")
    return value


def _check_storable(value: Any, where: str) -> None:
    at = f" at {where}" if where else ""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"contains a NUL character (\\u0000){at}, which cannot be stored")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number{at} (JSON has no NaN or Infinity)")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_storable(key, where)
            _check_storable(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")


# ----------------------------------------------------------------------------------------- errors


class StoreError(UserError):
    """A request the store refuses; `field` names the input at fault, if any (the API's `param`)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFound(StoreError):
    """The row does not exist *for this caller* (another user's row is reported the same way)."""


class Conflict(StoreError):
    """The write would break a uniqueness rule: a second trial for a question, a second vote."""


class InvalidRecord(DataError):
    """Bad input text. `field` is the field name (``rejected``), `index` the position in the batch."""

    def __init__(
        self,
        message: str,
        problems: list[str] | None = None,
        *,
        field: str | None = None,
        index: int | None = None,
    ):
        super().__init__(message, problems)
        self.field = field
        self.index = index


# ----------------------------------------------------------------------------- records handed out


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class NewPreference(BaseModel):
    """A preference as a user submits it: the user is the caller (from its key), never a field.

    Valid exactly when the core record (`fspo.data.schema.Preference`) with the caller's id is, so the
    store and the API accept what training data accepts, with each refusal at its field (``rejected``),
    and when a database can hold it (`storable`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    question: str
    chosen: str
    rejected: str
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable(value)

    @model_validator(mode="after")
    def _core_rules(self) -> NewPreference:
        # pydantic merges a ValidationError raised here into this model's, each error at its own field.
        Preference(user_id="caller", **self.model_dump())
        return self


class StoredPreference(_Out):
    id: int
    user_id: str
    question: str
    chosen: str
    rejected: str
    source: str
    created_at: datetime
    metadata: dict[str, Any]

    def record(self) -> Preference:
        """The project's core record (store bookkeeping, id/source/time, stays out of it)."""
        return Preference(
            user_id=self.user_id,
            question=self.question,
            chosen=self.chosen,
            rejected=self.rejected,
            metadata=self.metadata,
        )


class KeyInfo(_Out):
    id: str
    user_id: str
    scope: Scope
    name: str
    created_at: datetime
    revoked_at: datetime | None


class Principal(_Out):
    user_id: str
    scope: Scope
    key_id: str


class Trial(_Out):
    id: int
    participant: str
    question: str
    left_system: str
    right_system: str
    left_answer: str
    right_answer: str
    vote: Vote | None
    created_at: datetime
    voted_at: datetime | None


class Event(_Out):
    id: int
    user_id: str | None
    kind: str
    payload: dict[str, Any]
    created_at: datetime


# ------------------------------------------------------------------------------------ the tables


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no time zones: its DATETIME keeps the wall clock and drops the offset, so values are
    converted to UTC before storing and marked UTC when read back; PostgreSQL gets timestamptz.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


# Named constraints, so that migrations can refer to them (SQLite needs names to alter a table in batch).
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UserRow(Base):
    __tablename__ = "users"
    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    description: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class KeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("scope IN ('user', 'admin')", name="scope"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PreferenceRow(Base):
    __tablename__ = "preferences"
    # AUTOINCREMENT: SQLite would otherwise reuse the id of a deleted newest row, and an id a client
    # still holds (preference_ids, an event) would silently name a different preference.
    __table_args__ = (Index("ix_preferences_user_id_id", "user_id", "id"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id"))
    question: Mapped[str] = mapped_column(Text)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class TrialRow(Base):
    __tablename__ = "study_trials"
    __table_args__ = (
        # The one-vote-per-(participant, question) rule of the study lives in the database, so no
        # race between two requests can break it.
        UniqueConstraint("participant", "question"),
        CheckConstraint("vote IS NULL OR vote IN ('left', 'right', 'tie')", name="vote"),
        Index("ix_study_trials_participant_id", "participant", "id"),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    participant: Mapped[str] = mapped_column(ForeignKey("users.user_id"))
    question: Mapped[str] = mapped_column(Text)
    left_system: Mapped[str] = mapped_column(String(255))
    right_system: Mapped[str] = mapped_column(String(255))
    left_answer: Mapped[str] = mapped_column(Text)
    right_answer: Mapped[str] = mapped_column(Text)
    vote: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    voted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EventRow(Base):
    __tablename__ = "events"
    # No foreign key on user_id: the log must be able to record anything, including about users
    # that a later migration or an operator removes.
    __table_args__ = (Index("ix_events_user_id_id", "user_id", "id"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


# ------------------------------------------------------------------------------------ migrations


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


# --------------------------------------------------------------------------------------- helpers


def _hash(secret: str) -> str:
    # A plain sha256 is enough (no salt, no slow KDF): secrets come from `secrets` with 256 bits of
    # entropy, so there is no dictionary to attack, and every request must check a key fast.
    return hashlib.sha256(secret.encode()).hexdigest()


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(f"{name}: must be a non-empty string", field=name)
    return value


def _validated(
    user_id: str, items: Sequence[NewPreference | Preference | Mapping[str, Any]]
) -> list[Preference]:
    """Each item as a `Preference` of `user_id`, checked by the core record's own rules (non-blank
    text, chosen != rejected), so the store accepts exactly what training data accepts."""
    out: list[Preference] = []
    problems: list[str] = []
    first: tuple[str, int] | None = None
    for i, item in enumerate(items):
        try:
            if isinstance(item, Preference):
                if item.user_id != user_id:
                    raise InvalidRecord(
                        f"preferences[{i}].user_id: is {item.user_id!r}, the caller is {user_id!r}",
                        field="user_id",
                        index=i,
                    )
                _check_record(item, i)
                out.append(item)
                continue
            if isinstance(item, Mapping) and "user_id" in item:
                raise InvalidRecord(
                    f"preferences[{i}].user_id: the user comes from the API key, not the body",
                    field="user_id",
                    index=i,
                )
            new = item if isinstance(item, NewPreference) else NewPreference.model_validate(item)
            out.append(Preference(user_id=user_id, **new.model_dump()))
        except ValidationError as e:
            for err in e.errors():
                name = ".".join(str(p) for p in err["loc"]) or "preference"
                problems.append(f"preferences[{i}].{name}: {err['msg']}")
                first = first or (name, i)
        except TypeError as e:
            problems.append(f"preferences[{i}]: {e}")
            first = first or ("preference", i)
    if problems:
        assert first is not None
        msg = problems[0] if len(problems) == 1 else f"{len(problems)} problems in the preferences"
        raise InvalidRecord(msg, problems if len(problems) > 1 else None, field=first[0], index=first[1])
    return out


def _check_record(pref: Preference, index: int) -> None:
    """An `InvalidRecord` naming the field of a core record (one read from a file) that no database
    can hold faithfully (`storable`); records built from a `NewPreference` are already checked."""
    for name in ("user_id", "question", "chosen", "rejected", "metadata"):
        try:
            storable(getattr(pref, name))
        except ValueError as e:
            raise InvalidRecord(f"preferences[{index}].{name}: {e}", field=name, index=index) from None


def _pref(row: PreferenceRow) -> StoredPreference:
    return StoredPreference(
        id=row.id,
        user_id=row.user_id,
        question=row.question,
        chosen=row.chosen,
        rejected=row.rejected,
        source=row.source,
        created_at=row.created_at,
        metadata=row.meta or {},
    )


def _key(row: KeyRow) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        user_id=row.user_id,
        scope=row.scope,
        name=row.name,  # type: ignore[arg-type]
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _trial(row: TrialRow) -> Trial:
    return Trial(
        id=row.id,
        participant=row.participant,
        question=row.question,
        left_system=row.left_system,
        right_system=row.right_system,
        left_answer=row.left_answer,
        right_answer=row.right_answer,
        vote=row.vote,
        created_at=row.created_at,
        voted_at=row.voted_at,
    )  # type: ignore[arg-type]


def _user(row: UserRow) -> User:
    return User(user_id=row.user_id, description=row.description, metadata=row.meta or {})


# ------------------------------------------------------------------------------------- the store


class Store:
    """The serving database. See the module docstring for the transaction and identity rules."""

    def __init__(
        self, url: str = "sqlite:///fspo-serve.db", *, busy_timeout_ms: int = 5000, echo: bool = False
    ):
        self.url = url
        parsed = parse_url(url)
        self._sqlite = parsed.get_backend_name() == "sqlite"
        memory = self._sqlite and parsed.database in (None, "", ":memory:")
        kwargs: dict[str, Any] = {"echo": echo}
        if self._sqlite:
            # Pooled connections move between threads; the pool, not sqlite3, guards their use.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
            if memory:
                kwargs["poolclass"] = StaticPool  # one connection: each new one would be a new, empty DB
        self._engine: Engine = create_engine(url, **kwargs)
        # An in-memory database is one shared connection, which cannot hold two transactions at once.
        self._lock = threading.RLock() if memory else nullcontext()
        if self._sqlite:
            _sqlite_events(self._engine, busy_timeout_ms)
        self._writer = self._engine.execution_options(fspo_write=True)
        self._upgrade()

    # -- plumbing

    def _upgrade(self) -> None:
        from alembic import command

        with self._lock, self._writer.begin() as conn:
            command.upgrade(migration_config(conn), "head")

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        with (
            self._lock,
            Session(self._writer if write else self._engine, expire_on_commit=False) as s,
            s.begin(),
        ):
            yield s

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({shown_url(self.url)!r})"

    @staticmethod
    def _log(s: Session, kind: str, user_id: str | None, **payload: Any) -> None:
        s.add(EventRow(user_id=user_id, kind=kind, payload=payload))

    @staticmethod
    def _need_user(s: Session, user_id: str, field: str = "user_id") -> UserRow:
        row = s.get(UserRow, user_id)
        if row is None:
            raise NotFound(f"{field}: no user {user_id!r}", field=field)
        return row

    def _ensure(
        self, s: Session, user_id: str, description: str | None, metadata: dict | None
    ) -> tuple[UserRow, bool]:
        """(the user's row, whether anything was written), creating or updating it in session `s`."""
        _text("user_id", user_id)
        for name, value in (("user_id", user_id), ("description", description), ("metadata", metadata)):
            try:
                storable(value)
            except ValueError as e:
                raise InvalidRecord(f"{name}: {e}", field=name) from None
        row = s.get(UserRow, user_id)
        if row is None:
            row = UserRow(user_id=user_id, description=description, meta=dict(metadata or {}))
            s.add(row)
            s.flush()
            self._log(s, "user.create", user_id, description=description)
            return row, True
        changed = {}
        if description is not None and description != row.description:
            row.description = changed["description"] = description
        if metadata is not None and metadata != row.meta:
            row.meta = changed["metadata"] = dict(metadata)
        if changed:
            self._log(s, "user.update", user_id, fields=sorted(changed))
        return row, bool(changed)

    # -- users

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

    def ensure_user(self, user_id: str, description: str | None = None, metadata: dict | None = None) -> User:
        """The user, created if missing; a non-None description or metadata replaces the stored one."""
        return self._write_creating_user(lambda s: _user(self._ensure(s, user_id, description, metadata)[0]))

    def get_user(self, user_id: str) -> User | None:
        with self._session() as s:
            row = s.get(UserRow, user_id)
            return None if row is None else _user(row)

    def users(self) -> list[User]:
        with self._session() as s:
            return [
                _user(r) for r in s.scalars(select(UserRow).order_by(UserRow.created_at, UserRow.user_id))
            ]

    def import_users(self, users: Sequence[User]) -> int:
        """Create or update every user in one transaction; returns how many were created or changed."""
        with self._session(write=True) as s:
            return sum(self._ensure(s, u.user_id, u.description, u.metadata)[1] for u in users)

    # -- keys

    def create_key(self, user_id: str, scope: Scope = "user", name: str = "") -> tuple[KeyInfo, str]:
        """A new key for `user_id` (created if missing): its info and the plaintext, which is never stored."""
        if scope not in SCOPES:
            raise InvalidRecord(f"scope: must be one of {', '.join(SCOPES)}, not {scope!r}", field="scope")
        _text("user_id", user_id)
        try:
            storable(name)
        except ValueError as e:
            raise InvalidRecord(f"name: {e}", field="name") from None
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)

        def write(s: Session) -> KeyInfo:
            self._ensure(s, user_id, None, None)
            row = KeyRow(id=key_id, user_id=user_id, secret_sha256=_hash(secret), scope=scope, name=name)
            s.add(row)
            s.flush()
            self._log(s, "key.create", user_id, key_id=key_id, scope=scope, name=name)
            return _key(row)

        return self._write_creating_user(write), f"{KEY_PREFIX}-{key_id}-{secret}"

    def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None for anything else: malformed, unknown, wrong secret, revoked."""
        if not isinstance(key, str):
            return None
        m = _KEY_RE.fullmatch(key.strip())
        if m is None:
            return None
        key_id, secret = m.groups()
        with self._session() as s:
            row = s.get(KeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(_hash(secret), row.secret_sha256):
                return None
            return Principal(user_id=row.user_id, scope=row.scope, key_id=row.id)  # type: ignore[arg-type]

    def keys(self, user_id: str | None = None) -> list[KeyInfo]:
        q = select(KeyRow).order_by(KeyRow.created_at, KeyRow.id)
        if user_id is not None:
            q = q.where(KeyRow.user_id == user_id)
        with self._session() as s:
            return [_key(r) for r in s.scalars(q)]

    def revoke_key(self, key_id: str) -> bool:
        """True when the key existed and was live; it fails `authenticate` from now on."""
        with self._session(write=True) as s:
            row = s.get(KeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = _now()
            self._log(s, "key.revoke", row.user_id, key_id=key_id)
            return True

    # -- preferences

    def add_preferences(
        self,
        user_id: str,
        prefs: Sequence[NewPreference | Preference | Mapping[str, Any]],
        source: str = "api",
    ) -> list[StoredPreference]:
        """Store `prefs` for `user_id` (which must exist) in one transaction: all or none."""
        records = _validated(user_id, prefs)
        _text("source", source)
        if not records:
            return []
        with self._session(write=True) as s:
            self._need_user(s, user_id)
            rows = [
                PreferenceRow(
                    user_id=user_id,
                    question=p.question,
                    chosen=p.chosen,
                    rejected=p.rejected,
                    source=source,
                    meta=dict(p.metadata),
                )
                for p in records
            ]
            s.add_all(rows)
            s.flush()
            self._log(s, "preference.add", user_id, ids=[r.id for r in rows], source=source)
            return [_pref(r) for r in rows]

    def preferences(self, user_id: str, limit: int = 50, before: int | None = None) -> list[StoredPreference]:
        """The user's preferences, newest first; `before` (an id) continues a page (keyset paging)."""
        if not isinstance(limit, int) or limit < 1:
            raise InvalidRecord(f"limit: must be a positive integer, not {limit!r}", field="limit")
        q = select(PreferenceRow).where(PreferenceRow.user_id == user_id)
        if before is not None:
            q = q.where(PreferenceRow.id < before)
        with self._session() as s:
            return [_pref(r) for r in s.scalars(q.order_by(PreferenceRow.id.desc()).limit(limit))]

    def shots(
        self, user_id: str, n: int | None = None, ids: Sequence[int] | None = None
    ) -> list[StoredPreference]:
        """The user's shots for an episode, oldest first (the order episodes give shots), with their ids
        (`StoredPreference.record` is the episode's shot).

        `ids`: exactly these preferences (each must be this user's: else NotFound naming the first id
        that is not; `n` is then ignored). Otherwise the newest `n` (None: all).
        """
        q = select(PreferenceRow).where(PreferenceRow.user_id == user_id)
        if ids is not None:
            wanted = list(dict.fromkeys(ids))
            with self._session() as s:
                rows = list(s.scalars(q.where(PreferenceRow.id.in_(wanted)).order_by(PreferenceRow.id)))
            missing = [i for i in wanted if i not in {r.id for r in rows}]
            if missing:
                raise NotFound(f"preference_ids: no preference {missing[0]} of yours", field="preference_ids")
            return [_pref(r) for r in rows]
        if n is not None and (not isinstance(n, int) or n < 0):
            raise InvalidRecord(f"shots: must be a non-negative integer, not {n!r}", field="shots")
        if n == 0:
            return []
        q = q.order_by(PreferenceRow.id.desc())
        if n is not None:
            q = q.limit(n)
        with self._session() as s:
            rows = list(s.scalars(q))
        return [_pref(r) for r in reversed(rows)]

    def preference_counts(self) -> dict[str, int]:
        """Every user's number of preferences (a user without any is absent), in one query."""
        q = select(PreferenceRow.user_id, func.count()).group_by(PreferenceRow.user_id)
        with self._session() as s:
            return {user_id: count for user_id, count in s.execute(q)}

    def count_preferences(self, user_id: str) -> int:
        with self._session() as s:
            return s.scalar(
                select(func.count()).select_from(PreferenceRow).where(PreferenceRow.user_id == user_id)
            )

    def delete_preference(self, user_id: str, pref_id: int) -> bool:
        """False when there is no such preference of this user (another user's is never touched)."""
        with self._session(write=True) as s:
            res = s.execute(
                delete(PreferenceRow).where(PreferenceRow.id == pref_id, PreferenceRow.user_id == user_id)
            )
            if res.rowcount != 1:
                return False
            self._log(s, "preference.delete", user_id, ids=[pref_id])
            return True

    def delete_preferences(self, user_id: str) -> int:
        """Delete all of the user's preferences; returns how many."""
        with self._session(write=True) as s:
            res = s.execute(delete(PreferenceRow).where(PreferenceRow.user_id == user_id))
            self._log(s, "preference.delete_all", user_id, count=res.rowcount)
            return res.rowcount

    def import_preferences(self, prefs: Sequence[Preference], source: str = "import") -> int:
        """Store core records (each with its own user, created if missing) in one transaction."""
        _text("source", source)
        for i, p in enumerate(prefs):
            if not isinstance(p, Preference):
                raise InvalidRecord(
                    f"preferences[{i}]: expected a Preference record, got {type(p).__name__}", index=i
                )
            _check_record(p, i)
        with self._session(write=True) as s:
            for user_id in dict.fromkeys(p.user_id for p in prefs):
                self._ensure(s, user_id, None, None)
            # Rows in the given order, so ids (and an export) keep the order of the file imported.
            rows = [
                PreferenceRow(
                    user_id=p.user_id,
                    question=p.question,
                    chosen=p.chosen,
                    rejected=p.rejected,
                    source=source,
                    meta=dict(p.metadata),
                )
                for p in prefs
            ]
            s.add_all(rows)
            s.flush()
            by_user: dict[str, list[int]] = {}
            for r in rows:
                by_user.setdefault(r.user_id, []).append(r.id)
            for user_id, ids in by_user.items():
                self._log(s, "preference.import", user_id, ids=ids, source=source)
        return len(prefs)

    def export_preferences(self, user_id: str | None = None) -> list[Preference]:
        """Core records in the order they were stored (training data from real people)."""
        q = select(PreferenceRow).order_by(PreferenceRow.id)
        if user_id is not None:
            q = q.where(PreferenceRow.user_id == user_id)
        with self._session() as s:
            return [_pref(r).record() for r in s.scalars(q)]

    # -- study trials

    def create_trial(
        self,
        participant: str,
        question: str,
        left_system: str,
        right_system: str,
        left_answer: str,
        right_answer: str,
    ) -> Trial:
        """A new blind trial; Conflict when the participant already has one for this question.

        An answer may be empty (a model may stop at once): the trial keeps what the system said, as
        the offline evaluation judges it. Every other field must be a non-blank text."""
        fields = {
            "participant": participant,
            "question": question,
            "left_system": left_system,
            "right_system": right_system,
        }
        for name, value in fields.items():
            _text(name, value)
        answers = {"left_answer": left_answer, "right_answer": right_answer}
        for name, value in answers.items():
            if not isinstance(value, str):
                raise InvalidRecord(f"{name}: must be a string, not {type(value).__name__}", field=name)
        fields.update(answers)
        try:
            with self._session(write=True) as s:
                self._need_user(s, participant, "participant")
                row = TrialRow(**fields)
                s.add(row)
                s.flush()
                self._log(
                    s,
                    "trial.create",
                    participant,
                    trial_id=row.id,
                    question=question,
                    left_system=left_system,
                    right_system=right_system,
                )
                return _trial(row)
        except IntegrityError as e:
            # The UNIQUE(participant, question) constraint: the only one a valid insert can break.
            raise Conflict(
                f"question: participant {participant!r} already has a trial for it", field="question"
            ) from e

    def trials(self, participant: str | None = None) -> list[Trial]:
        q = select(TrialRow).order_by(TrialRow.id)
        if participant is not None:
            q = q.where(TrialRow.participant == participant)
        with self._session() as s:
            return [_trial(r) for r in s.scalars(q)]

    def vote(self, participant: str, trial_id: int, choice: str) -> Trial:
        """Record the participant's one vote. The UPDATE only matches an unvoted trial of theirs, so two
        racing votes cannot both land; which of NotFound/Conflict is read in the same transaction."""
        if choice not in VOTES:
            raise InvalidRecord(f"choice: must be one of {', '.join(VOTES)}, not {choice!r}", field="choice")
        with self._session(write=True) as s:
            res = s.execute(
                update(TrialRow)
                .where(TrialRow.id == trial_id, TrialRow.participant == participant, TrialRow.vote.is_(None))
                .values(vote=choice, voted_at=_now())
                .execution_options(synchronize_session=False)
            )
            row = s.scalar(
                select(TrialRow).where(TrialRow.id == trial_id, TrialRow.participant == participant)
            )
            if row is None:
                raise NotFound(f"trial_id: no trial {trial_id} of yours", field="trial_id")
            if res.rowcount != 1:
                raise Conflict(f"trial_id: trial {trial_id} already has a vote", field="trial_id")
            s.refresh(row)
            self._log(s, "trial.vote", participant, trial_id=trial_id, choice=choice)
            return _trial(row)

    # -- events

    def events(
        self, user_id: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[Event]:
        """The append-only log, oldest first (all users' when `user_id` is None); `limit`: only the newest
        `limit` events, chosen by the database (the log only grows, so it is never read whole for a page)."""
        q = select(EventRow)
        if user_id is not None:
            q = q.where(EventRow.user_id == user_id)
        if kind is not None:
            q = q.where(EventRow.kind == kind)
        q = q.order_by(EventRow.id.desc()).limit(limit) if limit is not None else q.order_by(EventRow.id)
        with self._session() as s:
            rows = list(s.scalars(q))
        if limit is not None:
            rows.reverse()
        return [
            Event(id=r.id, user_id=r.user_id, kind=r.kind, payload=r.payload or {}, created_at=r.created_at)
            for r in rows
        ]


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
