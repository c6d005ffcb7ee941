"""The store's tables (SQLAlchemy ORM). alembic's revisions in ``fspo/serve/migrations`` create exactly
these; a change here needs a new revision (`fspo.serve.store.database.migration_config` says how)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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


def utc_now() -> datetime:
    return datetime.now(UTC)


# Columns that several tables declare alike; `Mapped[SerialId]` takes the `mapped_column` given here.
SerialId = Annotated[int, mapped_column(Integer, primary_key=True)]
CreatedAt = Annotated[datetime, mapped_column(default=utc_now)]

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
    # A column's type when it gives none: unbounded text, and times in UTC; a bounded string says its length.
    type_annotation_map = {str: Text, datetime: UTCDateTime}


class UserRow(Base):
    __tablename__ = "users"
    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    description: Mapped[str | None]
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[CreatedAt]


class KeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("scope IN ('user', 'admin', 'study')", name="scope"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[CreatedAt]
    revoked_at: Mapped[datetime | None]


class PreferenceRow(Base):
    __tablename__ = "preferences"
    # AUTOINCREMENT: SQLite would otherwise reuse the id of a deleted newest row, and an id a client
    # still holds (preference_ids, an event) would silently name a different preference.
    __table_args__ = (Index("ix_preferences_user_id_id", "user_id", "id"), {"sqlite_autoincrement": True})
    id: Mapped[SerialId]
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id"))
    question: Mapped[str]
    chosen: Mapped[str]
    rejected: Mapped[str]
    source: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[CreatedAt]


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
    id: Mapped[SerialId]
    participant: Mapped[str] = mapped_column(ForeignKey("users.user_id"))
    question: Mapped[str]
    left_system: Mapped[str] = mapped_column(String(255))
    right_system: Mapped[str] = mapped_column(String(255))
    left_answer: Mapped[str]
    right_answer: Mapped[str]
    vote: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[CreatedAt]
    voted_at: Mapped[datetime | None]


class ParticipantRow(Base):
    """A study participant: how they come back (their resume code's hash), the one-time invite they
    joined with, if the study has invites, and their seat (1, 2, ...): a UNIQUE seat is how the
    database itself keeps a capped study from taking more participants than it has seats, whatever
    the race between joins."""

    __tablename__ = "study_participants"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id"), primary_key=True)
    resume_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    invite_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    seat: Mapped[int] = mapped_column(Integer, unique=True)
    created_at: Mapped[CreatedAt]


class LabelRow(Base):
    """A participant's answer to one pair of the study's bank: a, b, or no preference ("none"). A or b
    is also stored as their preference (`preference_id`), which is what their shots are made of."""

    __tablename__ = "study_labels"
    __table_args__ = (
        UniqueConstraint("participant", "pair_id"),
        CheckConstraint("choice IN ('a', 'b', 'none')", name="choice"),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[SerialId]
    participant: Mapped[str] = mapped_column(ForeignKey("users.user_id"))
    pair_id: Mapped[int] = mapped_column(Integer)
    choice: Mapped[str] = mapped_column(String(8))
    preference_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[CreatedAt]


class EventRow(Base):
    __tablename__ = "events"
    # No foreign key on user_id: the log must be able to record anything, including about users
    # that a later migration or an operator removes.
    __table_args__ = (Index("ix_events_user_id_id", "user_id", "id"), {"sqlite_autoincrement": True})
    id: Mapped[SerialId]
    user_id: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[CreatedAt]
