"""The first schema: users, api_keys, preferences, study_trials, events.

Revision ID: 0001
Revises:
Created: 2026-05-10

Written out in full (not built from the ORM models), so this revision keeps creating exactly this
schema whatever the models become; later changes are new revisions.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_AUTOINC = {"sqlite_autoincrement": True}


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("user_id", name="pk_users"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        _time("created_at"),
        _time("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(["user_id"], ["users.user_id"], name="fk_api_keys_user_id_users"),
        sa.CheckConstraint("scope IN ('user', 'admin')", name="ck_api_keys_scope"),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_table(
        "preferences",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("chosen", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_preferences"),
        sa.ForeignKeyConstraint(["user_id"], ["users.user_id"], name="fk_preferences_user_id_users"),
        **_AUTOINC,
    )
    op.create_index("ix_preferences_user_id_id", "preferences", ["user_id", "id"])
    op.create_table(
        "study_trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("participant", sa.String(255), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("left_system", sa.String(255), nullable=False),
        sa.Column("right_system", sa.String(255), nullable=False),
        sa.Column("left_answer", sa.Text(), nullable=False),
        sa.Column("right_answer", sa.Text(), nullable=False),
        sa.Column("vote", sa.String(8), nullable=True),
        _time("created_at"),
        _time("voted_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_study_trials"),
        sa.ForeignKeyConstraint(["participant"], ["users.user_id"], name="fk_study_trials_participant_users"),
        sa.UniqueConstraint("participant", "question", name="uq_study_trials_participant_question"),
        sa.CheckConstraint("vote IS NULL OR vote IN ('left', 'right', 'tie')", name="ck_study_trials_vote"),
        **_AUTOINC,
    )
    op.create_index("ix_study_trials_participant_id", "study_trials", ["participant", "id"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        **_AUTOINC,
    )
    op.create_index("ix_events_user_id_id", "events", ["user_id", "id"])
    if op.get_bind().dialect.name == "sqlite":
        # The log is append-only by construction (the store never updates or deletes an event); on
        # SQLite the database enforces it too, against anything else writing to the file.
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER events_append_only_{verb.lower()} BEFORE {verb} ON events "
                "BEGIN SELECT RAISE(ABORT, 'events are append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS events_append_only_{verb}")
    for index, table in [
        ("ix_events_user_id_id", "events"),
        ("ix_study_trials_participant_id", "study_trials"),
        ("ix_preferences_user_id_id", "preferences"),
        ("ix_api_keys_user_id", "api_keys"),
    ]:
        op.drop_index(index, table_name=table)
    for table in ("events", "study_trials", "preferences", "api_keys", "users"):
        op.drop_table(table)
