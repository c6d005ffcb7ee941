"""A user's preferences: added, listed a page at a time, taken as an episode's shots, deleted.

Identity: every method takes the caller's user id (from its API key) and touches only that user's
rows: the WHERE clause carries it, nothing is filtered in Python afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select

from fspo.data.schema import Preference
from fspo.serve.store.database import Database
from fspo.serve.store.errors import InvalidRecord, NotFound
from fspo.serve.store.events import log_event
from fspo.serve.store.records import NewPreference, StoredPreference, require_text, storable
from fspo.serve.store.tables import PreferenceRow
from fspo.serve.store.users import need_user


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
                check_record(item, i)
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


def check_record(pref: Preference, index: int) -> None:
    """An `InvalidRecord` naming the field of a core record (one read from a file) that no database
    can hold faithfully (`storable`); records built from a `NewPreference` are already checked."""
    for name in ("user_id", "question", "chosen", "rejected", "metadata"):
        try:
            storable(getattr(pref, name), f"preferences[{index}].{name}")
        except ValueError as e:
            raise InvalidRecord(str(e), field=name, index=index) from None


def preference_row(pref: Preference, source: str) -> PreferenceRow:
    return PreferenceRow(
        user_id=pref.user_id,
        question=pref.question,
        chosen=pref.chosen,
        rejected=pref.rejected,
        source=source,
        meta=dict(pref.metadata),
    )


def stored_preference(row: PreferenceRow) -> StoredPreference:
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


class Preferences(Database):
    def add_preferences(
        self,
        user_id: str,
        prefs: Sequence[NewPreference | Preference | Mapping[str, Any]],
        source: str = "api",
    ) -> list[StoredPreference]:
        """Store `prefs` for `user_id` (which must exist) in one transaction: all or none."""
        records = _validated(user_id, prefs)
        require_text("source", source)
        if not records:
            return []
        with self._session(write=True) as s:
            need_user(s, user_id)
            rows = [preference_row(p, source) for p in records]
            s.add_all(rows)
            s.flush()
            log_event(s, "preference.add", user_id, ids=[r.id for r in rows], source=source)
            return [stored_preference(r) for r in rows]

    def preferences(self, user_id: str, limit: int = 50, before: int | None = None) -> list[StoredPreference]:
        """The user's preferences, newest first; `before` (an id) continues a page (keyset paging)."""
        if not isinstance(limit, int) or limit < 1:
            raise InvalidRecord(f"limit: must be a positive integer, not {limit!r}", field="limit")
        q = select(PreferenceRow).where(PreferenceRow.user_id == user_id)
        if before is not None:
            q = q.where(PreferenceRow.id < before)
        with self._session() as s:
            return [stored_preference(r) for r in s.scalars(q.order_by(PreferenceRow.id.desc()).limit(limit))]

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
            return [stored_preference(r) for r in rows]
        if n is not None and (not isinstance(n, int) or n < 0):
            raise InvalidRecord(f"shots: must be a non-negative integer, not {n!r}", field="shots")
        if n == 0:
            return []
        q = q.order_by(PreferenceRow.id.desc())
        if n is not None:
            q = q.limit(n)
        with self._session() as s:
            rows = list(s.scalars(q))
        return [stored_preference(r) for r in reversed(rows)]

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
            log_event(s, "preference.delete", user_id, ids=[pref_id])
            return True

    def delete_preferences(self, user_id: str) -> int:
        """Delete all of the user's preferences; returns how many."""
        with self._session(write=True) as s:
            res = s.execute(delete(PreferenceRow).where(PreferenceRow.user_id == user_id))
            log_event(s, "preference.delete_all", user_id, count=res.rowcount)
            return res.rowcount
