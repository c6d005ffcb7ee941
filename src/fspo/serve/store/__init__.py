"""The preference store of `fspo serve`: users, their API keys, their preferences, study trials, events.

`Store` is the one object callers hold: one SQLAlchemy engine (SQLite by default, any SQLAlchemy URL
works), whose methods come from one module per concern:

- `database`: the engine, SQLite's settings, sessions, the alembic upgrade to head on open
- `tables`: the ORM tables; `records`: the pydantic records handed in and out; `errors`
- `users`, `keys`, `preferences`, `participants` (the study's), `trials`: each concern's reads and writes
- `events`: the append-only log every write appends to; `transfer`: import and export of core records

Every method is one transaction in a session of its own, so a `Store` is safe to share between
threads, and every write logs one event in that same transaction. The caller's user id comes from
its API key (`Store.authenticate`); every preference method touches only that user's rows.
"""

from __future__ import annotations

from fspo.serve.store.database import head_revision, migration_config, parse_url, shown_url
from fspo.serve.store.errors import Conflict, InvalidRecord, NotFound, StoreError
from fspo.serve.store.events import EventLog
from fspo.serve.store.keys import KEY_PREFIX, Keys
from fspo.serve.store.participants import Participants, new_code
from fspo.serve.store.preferences import Preferences
from fspo.serve.store.records import (
    LABELS,
    SCOPES,
    VOTES,
    Event,
    KeyInfo,
    Label,
    NewPreference,
    Participant,
    Principal,
    Scope,
    StoredPreference,
    StudyLabel,
    Trial,
    Vote,
    storable,
)
from fspo.serve.store.tables import Base
from fspo.serve.store.transfer import Transfer
from fspo.serve.store.trials import Trials
from fspo.serve.store.users import Users


class Store(Users, Keys, Preferences, Participants, Trials, Transfer, EventLog):
    """The serving database: ``Store(url)`` opens it (creating or upgrading its schema); each base
    class holds one concern's methods, over the shared engine and sessions of `Database`."""


__all__ = [
    "KEY_PREFIX",
    "LABELS",
    "SCOPES",
    "VOTES",
    "Base",
    "Conflict",
    "Event",
    "InvalidRecord",
    "KeyInfo",
    "Label",
    "NewPreference",
    "NotFound",
    "Participant",
    "Principal",
    "Scope",
    "Store",
    "StoreError",
    "StoredPreference",
    "StudyLabel",
    "Trial",
    "Vote",
    "head_revision",
    "new_code",
    "migration_config",
    "parse_url",
    "shown_url",
    "storable",
]
