"""Scale-out on real parts: two `fspo serve` processes on one database (a SQLite file, a PostgreSQL
database), and `fspo serve --workers 2` behind one port.

The servers are real processes, started as an operator starts them (`fspo.testing.serve_processes`),
serving the tiny Llama. Requests race across the processes, and what the store promises must still
hold as seen through HTTP: every acknowledged preference is there (no lost write), the study takes one
label per pair, one trial per (participant, question) and one vote per trial (the loser of each race
gets a 409), and no request gets a 5xx.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from conftest import run_typer, write_jsonl
from fspo.serve.store import Store
from fspo.testing import serve_processes, toy_preferences, toy_users

USERS, ADDS, PARTICIPANTS = 6, 6, 3
CODE = "let-me-in"
# One thread a server: the machine running the tests may have two cores for several processes.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def study_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    write_jsonl(root / "pairs.jsonl", toy_preferences(toy_users(2), per_user=3))
    (root / "questions.txt").write_text("Which hat should I get?\nWhich cup should I get?\n")
    (root / "study.yaml").write_text(
        f"code: {CODE}\npairs: pairs.jsonl\nlabel_count: 2\nquestions: questions.txt\n"
        "trials_per_participant: 1\nfspo: fspo\nbaseline: base\nmax_new_tokens: 4\n"
    )
    return root / "study.yaml"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _pref(user: str, i: int) -> dict:
    return {"question": f"{user}: which colour {i}?", "chosen": f"red {i}", "rejected": f"blue {i}"}


def _caller(client: httpx.AsyncClient, servers: list[str], statuses: list[int]):
    """`call(server index, method, path, key, **request options)`, recording every status."""

    async def call(server: int, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = _auth(key) if key else {}
        r = await client.request(method, f"{servers[server % 2]}{path}", headers=headers, **kw)
        statuses.append(r.status_code)
        return r

    return call


async def _add_preferences(servers: list[str], keys: dict[str, str], statuses: list[int]) -> dict:
    """Every user at once adds ADDS preferences, two at a time, one to each server: (user -> acked ids)."""
    acked: dict[str, list[int]] = {u: [] for u in keys}
    async with httpx.AsyncClient(timeout=120) as client:
        call = _caller(client, servers, statuses)

        async def user(u: str) -> None:
            for i in range(0, ADDS, 2):
                both = await asyncio.gather(
                    *(
                        call(s, "POST", "/v1/users/me/preferences", keys[u], json=_pref(u, i + s))
                        for s in (0, 1)
                    )
                )
                acked[u] += [item["id"] for r in both if r.status_code == 201 for item in r.json()["data"]]

        await asyncio.gather(*(user(u) for u in keys))
    return acked


async def _take_the_study(servers: list[str], statuses: list[int]) -> list[str]:
    """PARTICIPANTS at once join (alternating servers) and race each step on both servers: each label,
    the trial, the vote. Each race has one winner and one 409. The participants' user ids."""
    async with httpx.AsyncClient(timeout=120) as client:
        call = _caller(client, servers, statuses)

        async def both(method: str, path: str, key: str, **kw) -> list[httpx.Response]:
            return list(await asyncio.gather(*(call(s, method, path, key, **kw) for s in (0, 1))))

        async def participant(n: int) -> str:
            joined = (await call(n, "POST", "/v1/study/join", json={"code": CODE})).json()
            key = joined["api_key"]
            while (state := (await call(n, "GET", "/v1/study/state", key)).json())["pair"] is not None:
                labels = await both(
                    "POST", "/v1/study/labels", key, json={"pair_id": state["pair"]["pair_id"], "choice": "a"}
                )
                assert sorted(r.status_code for r in labels) == [200, 409], [r.text for r in labels]
            shown = await both("GET", "/v1/study/next", key)
            assert all(r.status_code == 200 for r in shown), [r.text for r in shown]
            (trial_id,) = {r.json()["trial_id"] for r in shown}  # both servers show the one trial
            votes = await both("POST", f"/v1/study/trials/{trial_id}/vote", key, json={"choice": "left"})
            assert sorted(r.status_code for r in votes) == [200, 409], [r.text for r in votes]
            return joined["participant"]

        return list(await asyncio.gather(*(participant(n) for n in range(PARTICIPANTS))))


def _listed(server: str, key: str) -> set[int]:
    r = httpx.get(f"{server}/v1/users/me/preferences", params={"limit": 200}, headers=_auth(key), timeout=60)
    assert r.status_code == 200, r.text
    return {item["id"] for item in r.json()["data"]}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_servers_on_one_database_lose_nothing_and_take_one_vote(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, tiny_llama_folder: Path, study_file: Path
):
    url = (
        f"sqlite:///{tmp_path / 'serve.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    model = str(tiny_llama_folder)
    args = ["--model", model, "--baseline", f"base={model}:0", "--study", study_file, "--db", url]
    # Both start on a new database at once: one migrates it, the other waits (see test_serve_store.py).
    with (
        serve_processes([*args, "--max-samples", "1"], count=2, env=SERVER_ENV) as servers,
        Store(url) as store,
    ):
        keys = {f"u{i}": store.create_key(f"u{i}")[1] for i in range(USERS)}
        statuses: list[int] = []
        acked = asyncio.run(_add_preferences(servers, keys, statuses))
        participants = asyncio.run(_take_the_study(servers, statuses))

        for u, key in keys.items():
            assert len(acked[u]) == ADDS
            assert _listed(servers[0], key) == _listed(servers[1], key) == set(acked[u])
            assert store.count_preferences(u) == ADDS
        for p in participants:
            (trial,) = store.trials(p)
            assert trial.vote == "left"
            assert len(store.labels(p)) == 2
        assert len(store.events(kind="trial.vote")) == PARTICIPANTS
    assert max(statuses) < 500 and set(statuses) <= {200, 201, 409}


def test_workers_share_one_port_and_one_database(tmp_path: Path, tiny_llama_folder: Path):
    """`--workers 2`: two processes accept on one port; writes through either land once."""
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    args = ["--model", tiny_llama_folder, "--db", url, "--workers", "2", "--max-samples", "1"]
    with serve_processes(args, env=SERVER_ENV) as (server,), Store(url) as store:
        keys = {f"u{i}": store.create_key(f"u{i}")[1] for i in range(USERS)}
        statuses: list[int] = []
        acked = asyncio.run(_add_preferences([server, server], keys, statuses))
        for u, key in keys.items():
            assert _listed(server, key) == set(acked[u]) and len(acked[u]) == ADDS
            assert store.count_preferences(u) == ADDS
    assert set(statuses) == {201}


# ------------------------------------------------------------------------- --workers, in process


def test_workers_build_the_app_one_process_would_from_the_same_options(
    tmp_path: Path, tiny_llama_folder: Path, monkeypatch
):
    """`--workers 2` hands uvicorn a factory, which builds in each worker the app `fspo serve` builds in
    its own process: the options travel whole (here uvicorn is replaced by a stand-in that calls it)."""
    import uvicorn

    from fspo.cli import app
    from fspo.serve import cli as serve_cli

    served: list = []

    def run(target, **kwargs):
        served.append((target, kwargs))
        if isinstance(target, str):  # what uvicorn does in each worker process
            served.append((serve_cli.worker_app(), {}))

    monkeypatch.setattr(uvicorn, "run", run)
    flags = ["--model", tiny_llama_folder, "--db", f"sqlite:///{tmp_path / 'serve.db'}", "--cache-mb", "8"]
    flags += [
        "--baseline",
        f"base={tiny_llama_folder}:0",
        "--repetition-penalty",
        "1.3",
        "--max-samples",
        "4",
    ]
    assert run_typer(app, "serve", *flags)[0] == 0
    assert run_typer(app, "serve", *flags, "--workers", "2")[0] == 0
    (single, _), (target, kwargs), (worker, _) = served
    assert target == "fspo.serve.cli:worker_app" and kwargs["factory"] is True and kwargs["workers"] == 2
    assert worker.state.decoding == single.state.decoding and worker.state.limits == single.state.limits
    assert {n: s.shots for n, s in worker.state.systems.items()} == {"fspo": 8, "base": 0}
    assert serve_cli.WORKER_ENV not in os.environ
    worker.state.store.close()


def test_a_worker_that_cannot_start_stops_the_server_with_its_one_line_error(
    tmp_path: Path, tiny_llama_folder: Path, monkeypatch
):
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from fspo.cli import app
    from fspo.serve import cli as serve_cli

    def run(target, **kwargs):
        for _ in range(kwargs["workers"]):
            with pytest.raises(SystemExit) as exit_:
                serve_cli.worker_app()
            assert exit_.value.code == STARTUP_FAILURE  # uvicorn stops, instead of restarting it

    monkeypatch.setattr(uvicorn, "run", run)
    missing = tmp_path / "missing"
    flags = [
        "--model",
        tiny_llama_folder,
        "--baseline",
        f"b={missing}",
        "--db",
        f"sqlite:///{tmp_path / 'x.db'}",
    ]
    code, one = run_typer(app, "serve", *flags)
    assert code == 2 and "--baseline b" in one
    assert run_typer(app, "serve", *flags, "--workers", "3") == (2, one)  # the same error as one process
