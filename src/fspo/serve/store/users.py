"""Users: created on first need (a key, an import, a study participant), described, listed."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fspo.data.schema import User
from fspo.serve.store.database import Database
from fspo.serve.store.errors import InvalidRecord, NotFound
from fspo.serve.store.events import log_event
from fspo.serve.store.records import require_text, storable
from fspo.serve.store.tables import UserRow


def need_user(s: Session, user_id: str, field: str = "user_id") -> UserRow:
    """The user's row; `NotFound` naming `field` when there is none."""
    row = s.get(UserRow, user_id)
    if row is None:
        raise NotFound(f"{field}: no user {user_id!r}", field=field)
    return row


def ensure_user_row(
    s: Session, user_id: str, description: str | None, metadata: dict | None
) -> tuple[UserRow, bool]:
    """(the user's row, whether anything was written), creating or updating it in session `s`."""
    require_text("user_id", user_id)
    for name, value in (("user_id", user_id), ("description", description), ("metadata", metadata)):
        try:
            storable(value, name)
        except ValueError as e:
            raise InvalidRecord(str(e), field=name) from None
    row = s.get(UserRow, user_id)
    if row is None:
        row = UserRow(user_id=user_id, description=description, meta=dict(metadata or {}))
        s.add(row)
        s.flush()
        log_event(s, "user.create", user_id, description=description)
        return row, True
    changed = {}
    if description is not None and description != row.description:
        row.description = changed["description"] = description
    if metadata is not None and metadata != row.meta:
        row.meta = changed["metadata"] = dict(metadata)
    if changed:
        log_event(s, "user.update", user_id, fields=sorted(changed))
    return row, bool(changed)


def user_record(row: UserRow) -> User:
    return User(user_id=row.user_id, description=row.description, metadata=row.meta or {})


class Users(Database):
    def ensure_user(self, user_id: str, description: str | None = None, metadata: dict | None = None) -> User:
        """The user, created if missing; a non-None description or metadata replaces the stored one."""
        return self._write_creating_user(
            lambda s: user_record(ensure_user_row(s, user_id, description, metadata)[0])
        )

    def get_user(self, user_id: str) -> User | None:
        with self._session() as s:
            row = s.get(UserRow, user_id)
            return None if row is None else user_record(row)

    def users(self) -> list[User]:
        with self._session() as s:
            return [
                user_record(r)
                for r in s.scalars(select(UserRow).order_by(UserRow.created_at, UserRow.user_id))
            ]
