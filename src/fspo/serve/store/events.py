"""The append-only event log: every write of the store appends one event in its own transaction, so
the log and the data can never disagree."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fspo.serve.store.database import Database
from fspo.serve.store.records import Event
from fspo.serve.store.tables import EventRow


def log_event(s: Session, kind: str, user_id: str | None, **payload: Any) -> None:
    """Append an event to session `s`: it commits or rolls back with the write it records."""
    s.add(EventRow(user_id=user_id, kind=kind, payload=payload))


class EventLog(Database):
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
