"""Arbitrary JSON at every route of the serving API (hypothesis): never a 500, nothing stored by a
request that was refused, and every user's preferences and the operator's export still readable after.

Bodies are drawn from JSON of any shape whose keys are often the API's own field names (so requests get
past the first check and into the handlers), with texts that hold what broke servers before: lone
surrogates, NUL, deep nesting, huge numbers. Routes are read off the app, so a new route is fuzzed too.
``FSPO_FUZZ_EXAMPLES`` sets the examples per route (the suite's default keeps it to seconds; the issue's
bar is 2,000: ``FSPO_FUZZ_EXAMPLES=2000 pytest tests/test_serve_fuzz.py``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from fspo.serve.answerers import System, local_answerer
from fspo.serve.app import create_app
from fspo.serve.store import Store
from fspo.serve.study import StudyConfig
from fspo.testing import toy_preferences, toy_users

EXAMPLES = int(os.environ.get("FSPO_FUZZ_EXAMPLES", "25"))
FIELDS = [
    "prompt", "messages", "role", "content", "model", "max_tokens", "max_completion_tokens", "stream",
    "stream_options", "include_usage", "n", "best_of", "shots", "preference_ids", "mode", "temperature",
    "top_p", "seed", "stop", "user", "question", "chosen", "rejected", "metadata", "preferences", "code",
    "invite", "resume_code", "pair_id", "choice", "user_id", "scope", "name", "type", "text",
]  # fmt: skip
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        ["user", "fspo", "base", "a", "none", "left", "plain", "rat", "let-me-in", "\ud800", "x\x00"]
    ),
    st.text(alphabet=st.characters(codec=None), max_size=8),  # surrogates included
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=20),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), texts), inner, max_size=5),
    ),
    max_leaves=25,
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    json_values,
    st.integers(min_value=1, max_value=200).map(lambda depth: json.loads("[" * depth + "]" * depth)),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llama_folder: Path):
    root = tmp_path_factory.mktemp("fuzz")
    write_jsonl(root / "pairs.jsonl", toy_preferences(toy_users(2), per_user=3))
    (root / "questions.txt").write_text("Which hat should I get?\nWhich cup should I get?\n")
    (root / "study.yaml").write_text(
        "code: let-me-in\npairs: pairs.jsonl\nlabel_count: 2\nquestions: questions.txt\n"
        "trials_per_participant: 1\nfspo: fspo\nbaseline: base\nmax_new_tokens: 2\n"
    )
    store = Store(f"sqlite:///{root / 'serve.db'}")
    answerer = local_answerer(tiny_llama_folder, max_new_tokens_limit=2, cache_bytes=8 << 20)
    systems = [System("fspo", answerer, shots=4), System("base", answerer, shots=0)]
    app = create_app(store, systems, study=StudyConfig.load(root / "study.yaml"))
    client = TestClient(app, base_url="http://localhost")
    keys = {"user": store.create_key("fuzz-user")[1], "admin": store.create_key("root", scope="admin")[1]}
    keys["study"] = client.post("/v1/study/join", json={"code": "let-me-in"}).json()["api_key"]
    yield app, store, client, keys
    client.close()
    store.close()


def _routes(app) -> list[tuple[str, str]]:
    paths = app.openapi()["paths"]
    return sorted((m.upper(), path) for path, ops in paths.items() for m in ops)


ROUTES = [  # (method, path): the app's, read once without a store
    ("DELETE", "/v1/admin/keys/{key_id}"), ("DELETE", "/v1/users/me/preferences"),
    ("DELETE", "/v1/users/me/preferences/{pref_id}"), ("GET", "/v1/admin/events"), ("GET", "/v1/admin/keys"),
    ("GET", "/v1/admin/users"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
    ("GET", "/v1/study/next"), ("GET", "/v1/study/pairs"), ("GET", "/v1/study/state"),
    ("GET", "/v1/users/me"),
    ("GET", "/v1/users/me/description"), ("GET", "/v1/users/me/preferences"), ("POST", "/v1/admin/keys"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/study/join"),
    ("POST", "/v1/study/labels"), ("POST", "/v1/study/resume"), ("POST", "/v1/study/trials/{trial_id}/vote"),
    ("POST", "/v1/users/me/preferences"),
]  # fmt: skip


def test_the_fuzzed_routes_are_every_route(world):
    app, *_ = world
    assert _routes(app) == ROUTES


def _sendable(text: str) -> str:
    """`text` as a URL can carry it (a URL is UTF-8: a lone surrogate becomes U+FFFD)."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _scope(path: str) -> str:
    return "admin" if path.startswith("/v1/admin") else "study" if path.startswith("/v1/study") else "user"


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_arbitrary_json_never_breaks_a_route_or_the_store(world, method: str, path: str):
    app, store, client, keys = world

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        body=bodies,
        query=st.dictionaries(st.sampled_from([*FIELDS, "limit", "before"]), texts, max_size=3),
        segment=st.one_of(texts, st.integers(min_value=-(2**70), max_value=2**70).map(str)),
    )
    def one(body, query, segment):
        url = re.sub(r"\{[^}]+\}", lambda _: quote(_sendable(segment), safe="") or "x", path)
        events = len(store.events())
        prefs = store.export_preferences()
        content = json.dumps(body).encode("utf-8", "surrogatepass")
        r = client.request(
            method,
            url,
            params={
                k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for k, v in query.items()
            },
            content=content if method != "GET" else None,
            headers={"Authorization": f"Bearer {keys[_scope(path)]}", "Content-Type": "application/json"},
        )
        assert r.status_code < 500, (url, content[:300], r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
            assert len(store.events()) == events, "a refused request wrote to the store"
            assert store.export_preferences() == prefs
        # Every user's list and the export are still readable.
        listed = client.get("/v1/users/me/preferences", headers={"Authorization": f"Bearer {keys['user']}"})
        assert listed.status_code == 200, listed.text
        json.dumps([p.model_dump(mode="json") for p in store.export_preferences()]).encode()

    one()
