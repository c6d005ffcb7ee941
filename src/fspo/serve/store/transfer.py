"""Import and export of core records (`User`, `Preference`): files in, training data from real people out.
Unlike the API's writes, an import names each record's user itself (an operator's command, not a caller)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from fspo.data.schema import Preference, User
from fspo.serve.store.database import Database
from fspo.serve.store.errors import InvalidRecord
from fspo.serve.store.events import log_event
from fspo.serve.store.preferences import check_record, preference_row, stored_preference
from fspo.serve.store.records import require_text
from fspo.serve.store.tables import PreferenceRow
from fspo.serve.store.users import ensure_user_row


class Transfer(Database):
    def import_users(self, users: Sequence[User]) -> int:
        """Create or update every user in one transaction; returns how many were created or changed."""
        with self._session(write=True) as s:
            return sum(ensure_user_row(s, u.user_id, u.description, u.metadata)[1] for u in users)

    def import_preferences(self, prefs: Sequence[Preference], source: str = "import") -> int:
        """Store core records (each with its own user, created if missing) in one transaction."""
        require_text("source", source)
        for i, p in enumerate(prefs):
            if not isinstance(p, Preference):
                raise InvalidRecord(
                    f"preferences[{i}]: expected a Preference record, got {type(p).__name__}", index=i
                )
            check_record(p, i)
        with self._session(write=True) as s:
            for user_id in dict.fromkeys(p.user_id for p in prefs):
                ensure_user_row(s, user_id, None, None)
            # Rows in the given order, so ids (and an export) keep the order of the file imported.
            rows = [preference_row(p, source) for p in prefs]
            s.add_all(rows)
            s.flush()
            by_user: dict[str, list[int]] = {}
            for r in rows:
                by_user.setdefault(r.user_id, []).append(r.id)
            for user_id, ids in by_user.items():
                log_event(s, "preference.import", user_id, ids=ids, source=source)
        return len(prefs)

    def export_preferences(self, user_id: str | None = None) -> list[Preference]:
        """Core records in the order they were stored (training data from real people)."""
        q = select(PreferenceRow).order_by(PreferenceRow.id)
        if user_id is not None:
            q = q.where(PreferenceRow.user_id == user_id)
        with self._session() as s:
            return [stored_preference(r).record() for r in s.scalars(q)]
