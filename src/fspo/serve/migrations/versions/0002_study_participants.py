"""Study participants who can come back: a "study" key scope, participants (resume code, invite, seat)
and their labels of the bank's pairs (a, b or no preference).

Revision ID: 0002
Revises: 0001
Created: 2026-12-07

Participants of an earlier study (users whose metadata has ``"study": true``) get a participant row
(no resume code: they joined before there were any) and their keys the "study" scope, which keeps
them out of the routes that could unblind the study.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _scopes(scopes: str) -> None:
    """The api_keys table's CHECK on `scopes` (SQL). SQLite cannot alter a CHECK, and alembic's batch mode
    does not reflect one, so there the table is copied into its whole new definition (`copy_from`)."""
    check = f"scope IN ({scopes})"
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("ck_api_keys_scope", "api_keys", type_="check")
        op.create_check_constraint("ck_api_keys_scope", "api_keys", check)
        return
    table = sa.Table(
        "api_keys",
        sa.MetaData(),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(["user_id"], ["users.user_id"], name="fk_api_keys_user_id_users"),
        sa.CheckConstraint(check, name="ck_api_keys_scope"),
        sa.Index("ix_api_keys_user_id", "user_id"),
    )
    with op.batch_alter_table("api_keys", copy_from=table, recreate="always"):
        pass


def upgrade() -> None:
    _scopes("'user', 'admin', 'study'")
    op.create_table(
        "study_participants",
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("resume_sha256", sa.String(64), nullable=True),
        sa.Column("invite_sha256", sa.String(64), nullable=True),
        sa.Column("seat", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_study_participants"),
        sa.ForeignKeyConstraint(["user_id"], ["users.user_id"], name="fk_study_participants_user_id_users"),
        sa.UniqueConstraint("resume_sha256", name="uq_study_participants_resume_sha256"),
        sa.UniqueConstraint("invite_sha256", name="uq_study_participants_invite_sha256"),
        sa.UniqueConstraint("seat", name="uq_study_participants_seat"),
    )
    op.create_table(
        "study_labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("participant", sa.String(255), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("choice", sa.String(8), nullable=False),
        sa.Column("preference_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_study_labels"),
        sa.ForeignKeyConstraint(["participant"], ["users.user_id"], name="fk_study_labels_participant_users"),
        sa.UniqueConstraint("participant", "pair_id", name="uq_study_labels_participant_pair_id"),
        sa.CheckConstraint("choice IN ('a', 'b', 'none')", name="ck_study_labels_choice"),
        sqlite_autoincrement=True,
    )
    _earlier_participants()


def _earlier_participants() -> None:
    bind = op.get_bind()
    users = sa.table("users", sa.column("user_id"), sa.column("metadata"), sa.column("created_at"))
    keys = sa.table("api_keys", sa.column("user_id"), sa.column("scope"))
    participants = sa.table(
        "study_participants", sa.column("user_id"), sa.column("seat"), sa.column("created_at")
    )
    rows = bind.execute(sa.select(users).order_by(users.c.created_at, users.c.user_id)).all()
    seat = 0
    for user_id, metadata, created_at in rows:
        meta = json.loads(metadata) if isinstance(metadata, str) else (metadata or {})
        if meta.get("study") is not True:
            continue
        seat += 1
        bind.execute(participants.insert().values(user_id=user_id, seat=seat, created_at=created_at))
        bind.execute(keys.update().where(keys.c.user_id == user_id).values(scope="study"))


def downgrade() -> None:
    op.drop_table("study_labels")
    op.drop_table("study_participants")
    op.execute("UPDATE api_keys SET scope = 'user' WHERE scope = 'study'")
    _scopes("'user', 'admin'")
