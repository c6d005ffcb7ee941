"""The serving store (`fspo.serve.store`): schema migrations, SQLite settings, identity scoping, keys,
study trials, the event log, import/export, and concurrent writers on a real file.

What the store promises runs on both backends it supports: each test taking `db_url` (or `store`, `two`)
runs once on a SQLite file and once on a PostgreSQL database of its own (`postgres_url` in conftest.py,
skipped without PostgreSQL). Tests of SQLite's own settings take `sqlite_url` or `sqlite_store`."""

from __future__ import annotations

import hashlib
import math
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, event, text
from sqlalchemy.exc import DatabaseError

from fspo.core.errors import DataError, UserError
from fspo.data.schema import Preference, User
from fspo.serve.store import (
    Base,
    Conflict,
    InvalidRecord,
    NewPreference,
    NotFound,
    Store,
    head_revision,
)


def _new(i: int, tag: str = "") -> NewPreference:
    return NewPreference(
        question=f"question {tag}{i}?", chosen=f"good {tag}{i}", rejected=f"bad {tag}{i}", metadata={"i": i}
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'serve.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


@pytest.fixture
def store(db_url: str):
    with Store(db_url) as s:
        yield s


@pytest.fixture
def sqlite_store(sqlite_url: str):
    with Store(sqlite_url) as s:
        yield s


@pytest.fixture
def two(store: Store) -> Store:
    """Users a and b with three preferences each."""
    for u in ("a", "b"):
        store.ensure_user(u)
        store.add_preferences(u, [_new(i, u) for i in range(3)])
    return store


def _schema(conn) -> list[tuple]:
    """The schema as the database describes it (SQLite: each object's SQL; PostgreSQL: columns, indexes)."""
    if conn.dialect.name == "sqlite":
        return conn.execute(text("SELECT type, name, sql FROM sqlite_master ORDER BY name")).all()
    columns = text(
        "SELECT table_name, column_name, data_type, is_nullable, column_default "
        "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, column_name"
    )
    indexes = text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname"
    )
    return conn.execute(columns).all() + conn.execute(indexes).all()


def _statements(store: Store) -> list[str]:
    seen: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda conn, cur, stmt, *a: seen.append(stmt))
    return seen


def _at_once(count: int, work) -> list:
    """`work(i)` in `count` threads released together; each one's result, or the exception it raised."""
    go, out = threading.Barrier(count), [None] * count

    def run(i: int) -> None:
        go.wait()
        try:
            out[i] = work(i)
        except Exception as e:  # noqa: BLE001 - returned to the test, which asserts on it
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# ------------------------------------------------------------------------------------- migrations


def test_fresh_db_is_migrated_to_head_and_matches_the_orm(store: Store):
    with store.engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head_revision() == "0003"
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == head_revision()
        assert compare_metadata(ctx, Base.metadata) == []
        # The comparison does look at the database: against no tables it wants every table removed.
        removed = {d[1].name for d in compare_metadata(ctx, MetaData()) if d[0] == "remove_table"}
        assert removed == set(Base.metadata.tables) and "study_labels" in removed


def test_reopening_is_a_no_op(db_url: str):
    with Store(db_url) as s:
        s.ensure_user("a")
        s.add_preferences("a", [_new(0)])
        with s.engine.connect() as conn:
            schema = _schema(conn)
    with Store(db_url) as s:
        with s.engine.connect() as conn:
            assert _schema(conn) == schema
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(head_revision(),)]
        assert [p.question for p in s.preferences("a")] == ["question 0?"]
        assert [e.kind for e in s.events()] == ["user.create", "preference.add"]


def test_first_opens_at_once_all_migrate_safely(db_url: str):
    """Servers started together on a new database: one creates the schema, the others wait for it (SQLite:
    a lock on the file's folder; PostgreSQL: an advisory lock), and none fails. Processes, as servers
    are: alembic's own state is per process, so threads would not open at once."""
    opener = "import sys; from fspo.serve.store import Store; Store(sys.argv[1]).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", opener, db_url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    failures = [
        err.strip().splitlines()[-1] for p in procs if (err := p.communicate(timeout=120)[1]) and p.returncode
    ]
    assert failures == []
    with Store(db_url) as s, s.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(head_revision(),)]


def test_bad_url_is_a_user_error():
    with pytest.raises(UserError, match="not a database URL"):
        Store("no url at all")


def test_foreign_keys_are_enforced(store: Store):
    with pytest.raises(DatabaseError, match="(?i)foreign key"), store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO preferences (user_id, question, chosen, rejected, source, metadata, "
                "created_at) VALUES ('nobody', 'q', 'a', 'b', 'x', '{}', '2026-01-01')"
            )
        )


# ---------------------------------------------------------------------------------------- sqlite


def test_pragmas_are_set_on_every_connection(sqlite_store: Store):
    conns = [sqlite_store.engine.connect() for _ in range(3)]  # three pooled connections, each set on connect
    try:
        for conn in conns:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    finally:
        for conn in conns:
            conn.close()


def test_writes_begin_immediate_and_reads_begin_deferred(sqlite_store: Store):
    store = sqlite_store
    store.ensure_user("a")
    seen = _statements(store)
    store.add_preferences("a", [_new(0)])
    assert [s for s in seen if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"]
    seen.clear()
    store.preferences("a")
    store.shots("a", 2)
    assert [s for s in seen if s.startswith("BEGIN")] == ["BEGIN", "BEGIN"]


def test_a_writer_waits_for_the_write_lock(tmp_path: Path, sqlite_store: Store):
    store = sqlite_store
    store.ensure_user("a")
    holder = sqlite3.connect(tmp_path / "serve.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute(
        "INSERT INTO events (user_id, kind, payload, created_at) VALUES (NULL, 'x', '{}', '2026-01-01')"
    )
    threading.Timer(0.3, lambda: holder.execute("ROLLBACK")).start()
    t0 = time.perf_counter()
    store.add_preferences("a", [_new(0)])  # blocks on the lock (busy_timeout), then succeeds
    assert time.perf_counter() - t0 >= 0.25
    holder.close()
    assert store.count_preferences("a") == 1


def test_events_are_append_only_in_the_database(store: Store):
    store.ensure_user("a")
    sqls = ["UPDATE events SET kind = 'x'", "DELETE FROM events"]
    if store.engine.dialect.name == "postgresql":
        sqls.append("TRUNCATE events")
    for sql in sqls:
        with pytest.raises(DatabaseError, match="append-only"), store.engine.begin() as conn:
            conn.execute(text(sql))
    assert [e.kind for e in store.events()] == ["user.create"]


def test_in_memory_database_works_across_threads():
    with Store("sqlite://") as s:
        s.ensure_user("a")
        threads = [
            threading.Thread(
                target=lambda k=k: [s.add_preferences("a", [_new(i, f"t{k}")]) for i in range(10)]
            )
            for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.count_preferences("a") == 40


# ----------------------------------------------------------------------------------- preferences


def test_round_trip(store: Store):
    store.ensure_user("a", description="likes short answers", metadata={"age": 30})
    assert store.get_user("a") == User(user_id="a", description="likes short answers", metadata={"age": 30})
    assert store.get_user("zz") is None
    given = [
        _new(0),
        Preference(user_id="a", question="q1", chosen="c1", rejected="r1", metadata={"k": [1]}),
        {"question": "q2", "chosen": "c2", "rejected": "r2"},
    ]
    added = store.add_preferences("a", given, source="page")
    assert [p.id for p in added] == sorted(p.id for p in added)
    listed = store.preferences("a")
    assert listed == list(reversed(added))  # newest first
    p = listed[-1]
    assert (p.user_id, p.question, p.chosen, p.rejected, p.source, p.metadata) == (
        "a",
        "question 0?",
        "good 0",
        "bad 0",
        "page",
        {"i": 0},
    )
    assert p.created_at.tzinfo is UTC
    assert [q.record() for q in added] == [
        Preference(user_id="a", question="question 0?", chosen="good 0", rejected="bad 0", metadata={"i": 0}),
        given[1],
        Preference(user_id="a", question="q2", chosen="c2", rejected="r2"),
    ]
    assert store.count_preferences("a") == 3


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"question": "  ", "chosen": "c", "rejected": "r"}, "question"),
        ({"question": "q", "chosen": "", "rejected": "r"}, "chosen"),
        ({"question": "q", "chosen": "same", "rejected": " same "}, "rejected"),
        ({"question": "q", "chosen": "c"}, "rejected"),
        ({"question": "q", "chosen": "c", "rejected": "r", "extra": 1}, "extra"),
        ({"question": "q", "chosen": "c", "rejected": "r", "user_id": "b"}, "user_id"),
        (Preference(user_id="b", question="q", chosen="c", rejected="r"), "user_id"),
    ],
)
def test_bad_preferences_are_refused_naming_the_field(store: Store, item, field):
    store.ensure_user("a")
    with pytest.raises(InvalidRecord) as e:
        store.add_preferences("a", [_new(0), item])
    assert isinstance(e.value, DataError) and isinstance(e.value, UserError)
    assert (e.value.field, e.value.index) == (field, 1)
    assert f"preferences[1].{field}" in str(e.value)
    assert store.count_preferences("a") == 0  # all or nothing
    assert store.events(kind="preference.add") == []


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"question": "q\x00", "chosen": "c", "rejected": "r"}, "question"),
        ({"question": "q", "chosen": "c", "rejected": "r", "metadata": {"x": float("nan")}}, "metadata"),
        ({"question": "q", "chosen": "c", "rejected": "r", "metadata": {"x": [1, float("inf")]}}, "metadata"),
        ({"question": "q", "chosen": "c", "rejected": "r", "metadata": {"x\x00": 1}}, "metadata"),
        (Preference(user_id="a", question="q", chosen="c\x00", rejected="r"), "chosen"),
        (
            Preference(user_id="a", question="q", chosen="c", rejected="r", metadata={"x": -math.inf}),
            "metadata",
        ),
    ],
)
def test_what_no_database_can_hold_is_refused_naming_the_field(store: Store, item, field):
    """NUL in text (PostgreSQL refuses it) and NaN/Infinity in metadata (JSON has none: stored as null)."""
    store.ensure_user("a")
    with pytest.raises(InvalidRecord) as e:
        store.add_preferences("a", [_new(0), item])
    assert (e.value.field, e.value.index) == (field, 1)
    if isinstance(item, Preference):
        with pytest.raises(InvalidRecord) as e:
            store.import_preferences([item])
        assert e.value.field == field
    assert store.count_preferences("a") == 0
    with pytest.raises(InvalidRecord) as e:
        store.ensure_user("b", metadata={"score": float("nan")})
    assert e.value.field == "metadata" and store.get_user("b") is None


def test_adding_for_an_unknown_user_is_not_found(store: Store):
    with pytest.raises(NotFound, match="nobody"):
        store.add_preferences("nobody", [_new(0)])


def test_keyset_paging(store: Store):
    store.ensure_user("a")
    ids = [p.id for p in store.add_preferences("a", [_new(i) for i in range(7)])]
    pages, before = [], None
    while page := store.preferences("a", limit=3, before=before):
        pages.append([p.id for p in page])
        before = page[-1].id
    assert pages == [ids[::-1][:3], ids[::-1][3:6], ids[::-1][6:]]
    with pytest.raises(InvalidRecord) as e:
        store.preferences("a", limit=0)
    assert e.value.field == "limit"


def test_shots_are_the_newest_oldest_first(store: Store):
    store.ensure_user("a")
    added = store.add_preferences("a", [_new(i) for i in range(5)])
    assert store.shots("a", 3) == added[2:]  # with their ids: the API reports which shots it used
    assert store.shots("a") == added
    assert store.shots("a", 0) == []
    assert store.shots("a", 50) == added
    assert store.shots("a", ids=[added[3].id, added[0].id]) == [added[0], added[3]]
    with pytest.raises(InvalidRecord):
        store.shots("a", -1)


def test_deleted_ids_are_never_reused(store: Store):
    store.ensure_user("a")
    newest = store.add_preferences("a", [_new(0), _new(1)])[-1]
    assert store.delete_preference("a", newest.id)
    assert store.add_preferences("a", [_new(2)])[0].id > newest.id


def test_a_user_never_reaches_another_users_preferences(two: Store):
    a_ids = [p.id for p in two.preferences("a")]
    b_ids = [p.id for p in two.preferences("b")]
    assert not set(a_ids) & set(b_ids)
    assert all(p.user_id == "a" for p in two.preferences("a", before=max(b_ids) + 1))
    assert all(p.user_id == "a" for p in two.shots("a"))
    with pytest.raises(NotFound) as e:
        two.shots("a", ids=[a_ids[0], b_ids[1]])
    assert e.value.field == "preference_ids" and str(b_ids[1]) in str(e.value)
    with pytest.raises(NotFound):
        two.shots("a", ids=[10_000])
    assert not two.delete_preference("a", b_ids[0])
    assert two.delete_preferences("a") == 3
    assert two.count_preferences("a") == 0
    assert sorted(p.id for p in two.preferences("b")) == sorted(b_ids)
    assert {p.user_id for p in two.export_preferences("b")} == {"b"}


def test_delete(two: Store):
    first = two.preferences("a")[-1]
    assert two.delete_preference("a", first.id)
    assert not two.delete_preference("a", first.id)
    assert first.id not in [p.id for p in two.preferences("a")]
    assert two.count_preferences("a") == 2


# ------------------------------------------------------------------------------------------- keys


def test_keys_are_stored_hashed(tmp_path: Path, sqlite_store: Store):
    store = sqlite_store
    info, plaintext = store.create_key("a", name="laptop")  # creates the user
    assert store.get_user("a") is not None
    prefix, key_id, secret = plaintext.split("-", 2)
    assert (prefix, key_id) == ("fspo", info.id)
    assert (info.user_id, info.scope, info.name, info.revoked_at) == ("a", "user", "laptop", None)
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("serve.db*"))  # the database and its WAL
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw
    assert secret.encode() not in raw


def test_authenticate(store: Store):
    user_info, user_key = store.create_key("a")
    admin_info, admin_key = store.create_key("root", scope="admin")
    p = store.authenticate(user_key)
    assert (p.user_id, p.scope, p.key_id) == ("a", "user", user_info.id)
    assert store.authenticate(admin_key).scope == "admin"
    assert store.authenticate(f" {user_key}\n").user_id == "a"
    _, kid, secret = user_key.split("-", 2)
    _, admin_kid, admin_secret = admin_key.split("-", 2)
    for bad in [
        "",
        "fspo",
        "fspo--",
        f"fspo-{kid}",
        f"fspo-{kid}-",
        f"xspo-{kid}-{secret}",
        f"fspo-{kid}-{secret}x",
        f"fspo-{kid}-{admin_secret}",
        f"fspo-{admin_kid}-{secret}",
        f"fspo-{kid.upper()}-{secret}",
        f"fspo-0000000000000000-{secret}",
        "fspo-\x00-\x00",
        "é" * 100,
        None,
        42,
        b"bytes",
    ]:
        assert store.authenticate(bad) is None, bad
    with pytest.raises(InvalidRecord):
        store.create_key("a", scope="root")


def test_revoke(store: Store):
    info, key = store.create_key("a")
    _, other = store.create_key("a")
    assert store.revoke_key(info.id)
    assert store.authenticate(key) is None
    assert store.authenticate(other).user_id == "a"
    assert not store.revoke_key(info.id)
    assert not store.revoke_key("nope")
    listed = {k.id: k for k in store.keys("a")}
    assert listed[info.id].revoked_at is not None and len(listed) == 2
    store.create_key("b")
    assert len(store.keys()) == 3 and len(store.keys("b")) == 1


# ----------------------------------------------------------------------------------------- trials


def _trial(store: Store, participant: str = "p", question: str = "q?"):
    return store.create_trial(participant, question, "fspo", "base", "answer one", "answer two")


def test_one_trial_per_participant_and_question(store: Store):
    for u in ("p", "r"):
        store.ensure_user(u)
    t = _trial(store)
    assert (t.participant, t.question, t.left_system, t.vote, t.voted_at) == ("p", "q?", "fspo", None, None)
    with pytest.raises(Conflict):
        _trial(store)
    assert _trial(store, "r").participant == "r"  # another participant, same question: fine
    assert [x.participant for x in store.trials()] == ["p", "r"]
    assert store.trials("p") == [t]
    with pytest.raises(NotFound):
        _trial(store, "nobody")
    # A system may answer nothing: the trial keeps it as said. The other fields must be texts.
    store.create_trial("p", "q2", "fspo", "base", "answer", "")
    assert (store.trials("p")[-1].left_answer, store.trials("p")[-1].right_answer) == ("answer", "")
    for i, (field, args) in enumerate(
        [
            ("question", ("p", " ", "fspo", "base", "a", "b")),
            ("right_system", ("p", "q3", "fspo", "", "a", "b")),
            ("left_answer", ("p", "q4", "fspo", "base", None, "b")),
        ]
    ):
        with pytest.raises(InvalidRecord) as e:
            store.create_trial(*args)
        assert e.value.field == field, i


def test_vote_once(store: Store):
    for u in ("p", "r"):
        store.ensure_user(u)
    t = _trial(store)
    with pytest.raises(NotFound):
        store.vote("r", t.id, "left")  # not r's trial
    with pytest.raises(NotFound):
        store.vote("p", t.id + 100, "left")
    with pytest.raises(InvalidRecord) as e:
        store.vote("p", t.id, "up")
    assert e.value.field == "choice"
    voted = store.vote("p", t.id, "tie")
    assert voted.vote == "tie" and voted.voted_at is not None and voted.voted_at.tzinfo is UTC
    with pytest.raises(Conflict):
        store.vote("p", t.id, "left")
    assert [x.vote for x in store.trials("p")] == ["tie"]
    assert [e.payload["choice"] for e in store.events(kind="trial.vote")] == ["tie"]


def test_first_keys_racing_for_one_new_user_all_succeed(store: Store):
    """Off SQLite nothing serializes two writers: both find no user and insert it, one insert fails on
    the primary key, and the store runs that write again (`Database._write_creating_user`)."""
    made = _at_once(8, lambda i: store.create_key("new"))
    assert all(isinstance(m, tuple) for m in made), made
    assert len(store.keys("new")) == 8 and [u.user_id for u in store.users()] == ["new"]
    assert len(store.events(kind="user.create")) == 1


def test_racing_trials_for_one_question_make_one(store: Store):
    store.ensure_user("p")
    made = _at_once(6, lambda i: _trial(store))
    assert sum(not isinstance(m, Exception) for m in made) == 1
    assert all(isinstance(m, Conflict) for m in made if isinstance(m, Exception)), made
    assert len(store.trials("p")) == 1 and len(store.events(kind="trial.create")) == 1


def test_racing_joins_take_one_seat_each_and_no_more_than_there_are(store: Store):
    """Off SQLite, racing joins read the same highest seat and insert the same next one: the UNIQUE
    seat refuses all but one, and the others try the seat after it."""
    joined = _at_once(6, lambda i: store.join_study(max_participants=4))
    seats = sorted(j[0].seat for j in joined if isinstance(j, tuple))
    assert seats == [1, 2, 3, 4]
    assert all(isinstance(j, Conflict) for j in joined if not isinstance(j, tuple)), joined
    assert len(store.events(kind="study.join")) == 4


def test_racing_votes_land_once(store: Store):
    store.ensure_user("p")
    t = _trial(store)
    outcomes: list[str] = []
    go = threading.Barrier(8)

    def cast(choice: str) -> None:
        go.wait()
        try:
            store.vote("p", t.id, choice)
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=cast, args=(("left", "right")[i % 2],)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(outcomes) == ["conflict"] * 7 + ["ok"]
    assert len(store.events(kind="trial.vote")) == 1


# --------------------------------------------------------------------------------- events, import


def test_every_write_logs_one_event(store: Store):
    store.ensure_user("a")
    store.ensure_user("a")  # nothing changes: no event
    store.ensure_user("a", description="d")
    info, _ = store.create_key("a")
    store.revoke_key(info.id)
    added = store.add_preferences("a", [_new(0), _new(1)])
    store.delete_preference("a", added[0].id)
    store.delete_preference("a", added[0].id)  # nothing deleted: no event
    store.delete_preferences("a")
    t = _trial(store, "a")
    store.vote("a", t.id, "left")
    store.import_preferences([Preference(user_id="b", question="q", chosen="c", rejected="r")])
    assert [e.kind for e in store.events()] == [
        "user.create",
        "user.update",
        "key.create",
        "key.revoke",
        "preference.add",
        "preference.delete",
        "preference.delete_all",
        "trial.create",
        "trial.vote",
        "user.create",
        "preference.import",
    ]
    events = store.events("a")
    assert events[4].payload == {"ids": [p.id for p in added], "source": "api"}
    assert events[6].payload == {"count": 1}
    assert all(e.user_id == "a" and e.created_at.tzinfo is UTC for e in events)
    assert [e.kind for e in store.events("b")] == ["user.create", "preference.import"]


def test_a_page_of_events_and_the_counts_are_chosen_by_the_database(two: Store):
    everything = two.events()
    seen = _statements(two)
    newest = two.events(limit=3)
    assert newest == everything[-3:]  # oldest first, as the whole log
    assert two.events("a", limit=1) == [e for e in everything if e.user_id == "a"][-1:]
    assert all("LIMIT" in stmt for stmt in seen if stmt.startswith("SELECT"))
    seen.clear()
    two.ensure_user("c")
    seen.clear()
    assert two.preference_counts() == {"a": 3, "b": 3}  # c has none
    assert len([stmt for stmt in seen if stmt.startswith("SELECT")]) == 1


def test_a_first_key_survives_losing_the_race_to_create_its_user(store: Store, monkeypatch):
    """Off SQLite two first keys for one new user can both try to insert it; the loser retries."""
    from sqlalchemy.exc import IntegrityError

    from fspo.serve.store import keys

    real, lost = keys.ensure_user_row, []

    def racing(s, user_id, description, metadata):
        if not lost:  # the other writer inserted the user first: our insert fails on its primary key
            lost.append(user_id)
            raise IntegrityError("INSERT INTO users", {}, Exception("UNIQUE constraint failed"))
        return real(s, user_id, description, metadata)

    monkeypatch.setattr(keys, "ensure_user_row", racing)
    info, key = store.create_key("new")
    assert lost == ["new"] and store.authenticate(key).key_id == info.id


def test_urls_are_parsed_once_and_shown_without_password():
    from fspo.serve.store import parse_url, shown_url

    assert parse_url("sqlite:///x.db").get_backend_name() == "sqlite"
    with pytest.raises(UserError, match="--db"):
        parse_url("no url at all")
    shown = shown_url("postgresql://ann:hunter2@db.example/fspo")
    assert "hunter2" not in shown and "ann" in shown and "db.example/fspo" in shown


def test_import_export_round_trip(store: Store):
    records = [
        Preference(
            user_id=f"u{i % 3}",
            question=f"q{i}",
            chosen=f"c{i}",
            rejected=f"r{i}",
            metadata={"level": i, "tags": ["x"]},
        )
        for i in range(10)
    ]
    assert store.import_preferences(records) == 10
    assert store.export_preferences() == records
    assert store.export_preferences("u1") == [r for r in records if r.user_id == "u1"]
    assert {u.user_id for u in store.users()} == {"u0", "u1", "u2"}
    assert {p.source for p in store.preferences("u0")} == {"import"}
    users = [User(user_id="u0", description="terse"), User(user_id="u9", metadata={"k": 1})]
    assert store.import_users(users) == 2
    assert store.import_users(users) == 0
    assert store.get_user("u0").description == "terse" and store.get_user("u9") == users[1]


def test_import_is_all_or_nothing(store: Store):
    with pytest.raises(InvalidRecord):
        store.import_preferences([Preference(user_id="u", question="q", chosen="c", rejected="r"), {"x": 1}])
    assert store.users() == [] and store.export_preferences() == []


# ------------------------------------------------------------------------------------ concurrency


def test_concurrent_writers_lose_nothing(store: Store):
    users = [f"u{i}" for i in range(4)]
    for u in users:
        store.ensure_user(u)
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(k: int) -> None:
        try:
            for i in range(50):
                store.add_preferences(users[k % 4], [_new(i, f"t{k}-")])
        except BaseException as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    def read() -> None:
        try:
            while not stop.is_set():
                for u in users:
                    assert all(p.user_id == u for p in store.preferences(u, limit=20))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    writers = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    exported = store.export_preferences()
    assert len(exported) == 400 and len({p.question for p in exported}) == 400
    for k in range(8):
        mine = [p for p in store.export_preferences(users[k % 4]) if p.question.startswith(f"question t{k}-")]
        assert [p.metadata["i"] for p in mine] == list(range(50))  # each writer's order kept
    assert len(store.events(kind="preference.add")) == 400
