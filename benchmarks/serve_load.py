"""Load on `fspo serve` over loopback, and the per-user prefix cache side by side.

Measures two things in one run, on one database (`--db`: a SQLite file in a temporary folder, a
throwaway PostgreSQL server started for the run, or a URL given):

1. Load, on real `fspo serve` processes (`--servers`, each with `--workers`) on 127.0.0.1 and that
   database: `--users` simulated users at once, each with its own API key, spread over the servers
   (each user always sends to the same server; behind one server's port, its workers take connections
   as they come, so a user's requests are not sticky to a worker), each doing `--rounds` rounds of
   "add one preference" then "ask `--asks` questions" (answers of at most `--tokens` tokens,
   personalized by all of its preferences so far). The texts are the roleplay simulator's. A bounded
   number of requests (users x rounds x (1 + asks)); it stops by itself. Printed: p50/p95 latency of
   each kind, requests/s, lost writes (an acknowledged preference missing from the store, or a count
   that differs) and cross-user reads (a listed preference of another user id or not among the ids the
   caller's own adds were acknowledged with, or a 2xx on another user's preference id; each user
   tries its neighbour's ids). Users share questions, so the check goes by id, never by text. And the
   share of a round's repeat asks (after its first) that reused the user's cached prefix: the first
   ask after an add always prefills (the shots changed), a repeat finds the prefix only in the
   process that prefilled it, so the share shows what --workers without sticky routing costs. A user
   whose connection stays open stays with one worker; `--no-keepalive` gives each request a new
   connection, as for a person who pauses longer than the server's keep-alive between questions.
2. Prefix cache: one user with 8 stored preferences asks `--cache-questions` questions, each answered
   three ways, interleaved: zero-shot, 8-shot with the prefix cache disabled (a second copy of the
   model served with `cache_bytes=0`) and 8-shot with it (warm: the user's prefix prefilled by an
   earlier request). The three arms must compare answers of the same length, so they run on a copy of
   the model with random weights (same architecture and tokenizer, so the same cost per token): its
   answers run to `--cache-tokens` instead of stopping where a trained model's would; the mean
   completion tokens of each arm are printed to show it. The goal: cached 8-shot within 1.2x of
   zero-shot.

   These arms run on an app served in this process (`fspo.serve.app.create_app`), before the load.

The prefix cache counters of the arms' systems (`PrefixCache.stats`) close the report.

    .venv/bin/python benchmarks/serve_load.py                      # model: runs/quickstart/fspo/model
    .venv/bin/python benchmarks/serve_load.py --model DIR --users 50 --rounds 3
    .venv/bin/python benchmarks/serve_load.py --db postgresql --servers 2 --users 100 --asks 2
    .venv/bin/python benchmarks/serve_load.py --workers 2 --asks 2 --no-keepalive   # one port, not sticky

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy.engine import make_url

from fspo.data.schema import Preference
from fspo.testing import postgres_cluster, serve_in_thread, serve_processes

QUICKSTART_MODEL = Path("runs/quickstart/fspo/model")


def _model(arg: str | None, tmp: Path, texts: list[str]) -> Path:
    if arg:
        return Path(arg)
    if QUICKSTART_MODEL.is_dir():
        return QUICKSTART_MODEL
    from fspo.models.default import init_model

    print("no quickstart model: serving a randomly initialised default model (size small)")
    return init_model(tmp / "model", texts, size="small", seed=0)


def _random_copy(model_dir: Path, out: Path, seed: int) -> Path:
    """`model_dir`'s architecture, tokenizer and training layout with freshly initialised weights."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fspo.infer.layout import CONFIG_FILE
    from fspo.models.loading import load_tokenizer

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    if (model_dir / CONFIG_FILE).is_file():
        shutil.copy(model_dir / CONFIG_FILE, out / CONFIG_FILE)
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {
        "p50_s": round(float(np.percentile(arr, 50)), 4),
        "p95_s": round(float(np.percentile(arr, 95)), 4),
    }


async def _user_load(
    client: httpx.AsyncClient, key: str, prefs: list[Preference], args: argparse.Namespace, out: dict
) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    questions = iter(p.question for p in prefs[args.rounds :])
    for r in range(args.rounds):
        p = prefs[r]
        start = time.perf_counter()
        resp = await client.post(
            "/v1/users/me/preferences",
            headers=auth,
            json={"question": p.question, "chosen": p.chosen, "rejected": p.rejected},
        )
        out["add"].append(time.perf_counter() - start)
        if resp.status_code == 201:
            out["acked"].extend(item["id"] for item in resp.json()["data"])
        else:
            out["errors"].append(f"add {resp.status_code}: {resp.text[:200]}")
        for a in range(args.asks):
            start = time.perf_counter()
            resp = await client.post(
                "/v1/chat/completions",
                headers=auth,
                json={"messages": [{"role": "user", "content": next(questions)}], "max_tokens": args.tokens},
            )
            out["ask"].append(time.perf_counter() - start)
            if resp.status_code != 200:
                out["errors"].append(f"ask {resp.status_code}: {resp.text[:200]}")
            elif a > 0:  # a repeat ask: its prefix is cached only in the process that served the last one
                out["repeat_cached"].append(
                    resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
                )


def _load(
    servers: list[str], store: Any, users: dict[str, str], prefs: dict[str, list[Preference]], args
) -> dict:
    """The load of the module docstring: user i sends to server i % len(servers)."""
    results = {u: {"add": [], "ask": [], "acked": [], "errors": [], "repeat_cached": []} for u in users}
    home = {u: servers[i % len(servers)] for i, u in enumerate(users)}

    async def run() -> float:
        keepalive = 0 if args.no_keepalive else None  # 0: no idle connection kept, each request a new one
        limits = httpx.Limits(max_connections=len(users) + 4, max_keepalive_connections=keepalive)
        clients = {url: httpx.AsyncClient(base_url=url, timeout=600, limits=limits) for url in servers}
        try:
            start = time.perf_counter()
            await asyncio.gather(
                *(_user_load(clients[home[u]], key, prefs[u], args, results[u]) for u, key in users.items())
            )
            return time.perf_counter() - start
        finally:
            for client in clients.values():
                await client.aclose()

    elapsed = asyncio.run(run())
    # Lost writes: every acknowledged id must be stored, for its user, and nothing else.
    lost = 0
    for u in users:
        stored = {p.id for p in store.preferences(u, limit=10_000)}
        lost += len(set(results[u]["acked"]) ^ stored)
    crossed = _cross_user_reads(home, users, results)
    adds = [t for r in results.values() for t in r["add"]]
    asks = [t for r in results.values() for t in r["ask"]]
    errors = [e for r in results.values() for e in r["errors"]]
    repeats = [hit for r in results.values() for hit in r["repeat_cached"]]
    return {
        "users": len(users),
        "requests": len(adds) + len(asks),
        "seconds": round(elapsed, 2),
        "requests_per_s": round((len(adds) + len(asks)) / elapsed, 2),
        "add_preference": _percentiles(adds),
        "ask": _percentiles(asks),
        "errors": len(errors),
        "first_errors": errors[:3],
        "lost_writes": lost,
        "cross_user_reads": crossed,
        "repeat_asks_cached_share": round(statistics.fmean(repeats), 3) if repeats else None,
    }


def _cross_user_reads(home: dict[str, str], users: dict[str, str], results: dict) -> int:
    """Each user lists its own preferences through the API, then tries its neighbour's ids."""
    crossed = 0
    names = list(users)
    for i, u in enumerate(names):
        auth = {"Authorization": f"Bearer {users[u]}"}
        with httpx.Client(base_url=home[u], timeout=60) as client:
            listed = client.get("/v1/users/me/preferences", headers=auth, params={"limit": 200}).json()[
                "data"
            ]
            acked = set(results[u]["acked"])
            crossed += sum(item["user_id"] != u or item["id"] not in acked for item in listed)
            neighbour = names[(i + 1) % len(names)]
            for pref_id in results[neighbour]["acked"][:2]:
                url = f"/v1/users/me/preferences/{pref_id}"
                crossed += client.delete(url, headers=auth).status_code < 300
                ask = {"messages": [{"role": "user", "content": "hi"}], "preference_ids": [pref_id]}
                crossed += client.post("/v1/chat/completions", headers=auth, json=ask).status_code < 300
    return crossed


def _cache_arms(base_url: str, key: str, questions: list[str], tokens: int) -> dict:
    auth = {"Authorization": f"Bearer {key}"}
    arms = {
        "zero_shot": {"model": "random", "shots": 0},
        "8_shot_uncached": {"model": "random-nocache", "shots": 8},
        "8_shot_cached": {"model": "random", "shots": 8},
    }
    times: dict[str, list[float]] = {a: [] for a in arms}
    completion: dict[str, list[int]] = {a: [] for a in arms}
    cached: dict[str, list[int]] = {a: [] for a in arms}
    with httpx.Client(base_url=base_url, timeout=600) as client:

        def ask(arm: str, question: str) -> dict:
            body = {
                "messages": [{"role": "user", "content": question}],
                "max_tokens": tokens,
                **arms[arm],
            }
            resp = client.post("/v1/chat/completions", headers=auth, json=body)
            resp.raise_for_status()
            return resp.json()

        ask("8_shot_cached", "warm-up: prefill this user's prefix")
        for question in questions:
            for arm in arms:
                start = time.perf_counter()
                usage = ask(arm, question)["usage"]
                times[arm].append(time.perf_counter() - start)
                completion[arm].append(usage["completion_tokens"])
                cached[arm].append(usage["prompt_tokens_details"]["cached_tokens"])
    out = {
        arm: {
            "mean_s": round(statistics.fmean(times[arm]), 4),
            "completion_tokens": round(statistics.fmean(completion[arm]), 1),
            "cached_tokens": round(statistics.fmean(cached[arm]), 1),
        }
        for arm in arms
    }
    zero = out["zero_shot"]["mean_s"]
    out["cached_over_zero_shot"] = round(out["8_shot_cached"]["mean_s"] / zero, 3)
    out["uncached_over_zero_shot"] = round(out["8_shot_uncached"]["mean_s"] / zero, 3)
    return out


def _database(arg: str, tmp: Path, stack: ExitStack) -> str:
    """The URL `--db` names: a new SQLite file in `tmp`, a database on a throwaway PostgreSQL server
    (flushing to disk as a production one does: `fspo.testing.postgres_cluster(fsync=True)`), or `arg`."""
    if arg == "sqlite":
        return f"sqlite:///{tmp / 'serve.db'}"
    if arg == "postgresql":
        return stack.enter_context(postgres_cluster(fsync=True)).create_database()
    return arg


def _prefix_cache(store: Any, random: Path, key: str, questions: list[str], args) -> tuple[dict, dict]:
    """The three arms of the module docstring on an app served in this process; its cache counters."""
    from fspo.serve.answerers import System, local_answerer
    from fspo.serve.app import create_app

    systems = [
        System("random", local_answerer(random)),
        System("random-nocache", local_answerer(random, cache_bytes=0)),
    ]
    with serve_in_thread(create_app(store, systems)) as url:
        cache = _cache_arms(url, key, questions, args.cache_tokens)
    counters = {s.name: s.answerer.cache.stats() for s in systems if s.answerer.cache is not None}
    return cache, counters


def _servers(args, model: Path, url: str, stack: ExitStack) -> list[str]:
    """`--servers` `fspo serve` processes on `url`, the machine's cores shared out among their processes
    (torch would give each process every core, and they would fight over them)."""
    threads = max(1, (os.cpu_count() or 1) // (args.servers * args.workers))
    flags = ["--model", model, "--db", url, "--workers", args.workers, "--cache-mb", args.cache_mb]
    return stack.enter_context(serve_processes(flags, args.servers, env={"OMP_NUM_THREADS": str(threads)}))


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the quickstart's FSPO model)")
    ap.add_argument(
        "--db",
        default="sqlite",
        help="sqlite (a file in a temporary folder), postgresql (a throwaway server; needs PostgreSQL's "
        "programs and psycopg) or a SQLAlchemy URL of an empty database",
    )
    ap.add_argument("--servers", type=int, default=1, help="fspo serve processes on the one database")
    ap.add_argument("--workers", type=int, default=1, help="fspo serve --workers of each server")
    ap.add_argument("--cache-mb", type=int, default=256, help="fspo serve --cache-mb of each server")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="add + ask rounds per user")
    ap.add_argument("--asks", type=int, default=1, help="questions asked after each round's add")
    ap.add_argument("--tokens", type=int, default=16, help="max new tokens of a load answer")
    ap.add_argument(
        "--no-keepalive",
        action="store_true",
        help="each load request on a new connection, as for a person who pauses longer than the server's "
        "keep-alive (uvicorn's: 5 s): with --workers, every request then goes to whichever worker accepts it",
    )
    ap.add_argument("--cache-questions", type=int, default=16)
    ap.add_argument("--cache-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = _arguments()
    from fspo.serve.store import Store
    from fspo.sim import simulate

    need = max(args.rounds * (1 + args.asks), 8 + args.cache_questions)
    data = simulate("roleplay", n_users=args.users + 1, prefs_per_user=need, seed=args.seed)
    by_user: dict[str, list[Preference]] = {}
    for p in data.preferences:
        by_user.setdefault(p.user_id, []).append(p)
    names = sorted(by_user)[: args.users + 1]

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        model = _model(args.model, Path(tmp), [t for p in data.preferences for t in (p.question, p.chosen)])
        print(f"model: {model}")
        random = _random_copy(model, Path(tmp) / "random", args.seed)
        url = _database(args.db, Path(tmp), stack)
        store = stack.enter_context(Store(url))
        print(f"database: {store!r}")
        keys = {u: store.create_key(u)[1] for u in names}
        probe_user, load_users = names[0], {u: keys[u] for u in names[1:]}
        store.add_preferences(probe_user, by_user[probe_user][:8], source="benchmark")
        questions = [p.question for p in by_user[probe_user][8:]][: args.cache_questions]
        cache, counters = _prefix_cache(store, random, keys[probe_user], questions, args)
        print(f"prefix cache: {json.dumps(cache)}")
        servers = _servers(args, model, url, stack)
        load = _load(servers, store, load_users, by_user, args)
        print(f"load: {json.dumps(load)}")
    setup = {"db": make_url(url).get_backend_name(), "servers": args.servers, "workers": args.workers}
    setup["keepalive"] = not args.no_keepalive
    print(
        json.dumps(
            {"model": str(model), **setup, "load": load, "prefix_cache": cache, "cache_counters": counters}
        )
    )


if __name__ == "__main__":
    main()
