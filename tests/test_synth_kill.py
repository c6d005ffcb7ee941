"""A real SIGKILL of `fspo synth run` in the middle of each stage, then the same command again: every
output file equals an uninterrupted run's, byte for byte.

Both runs use the same config file and stub server (`fspo.testing.serve_openai`), so only `--out`
differs. The stub's replies are a pure function of the request (`synth_script.script`; malformed JSON
for some first asks, every time they are sent, so the cache and its usage figures come out the same),
plus one 500 for some requests the first time the server sees them: a transient error leaves only
the retry counters behind. Not compared: `cache.sqlite` (sqlite's own file layout), `runs.jsonl` and
the card's `client_totals`, which count what each run sent, and so differ after a kill by design.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fspo.testing import Reply, serve_openai
from synth_script import first_user, script
from test_synth_pipeline import small_config

FSPO = [sys.executable, "-c", "from fspo.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
NOT_COMPARED = {"cache.sqlite", "cache.sqlite-wal", "cache.sqlite-shm", "runs.jsonl"}


class Replies:
    """The scripted LLM, a little slow (so a kill lands mid-stage), with malformed and 500 replies."""

    def __init__(self, delay: float = 0.01, spread: float = 0.04):
        # Replies in flight together would land together, and a kill could then miss the middle of a
        # stage; a delay growing with the order of arrival (8 slots, `spread` apart) staggers them in
        # the order they were asked, which is the order stages that write in order write them.
        self.delay = delay
        self.spread = spread
        self.arrivals = 0
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.injected = {"malformed": 0, "500": 0}

    def __call__(self, request: dict[str, Any]) -> Reply:
        text = first_user(request)
        first_ask = sum(m["role"] == "user" for m in request["messages"]) == 1
        if first_ask and sum(text.encode()) % 11 == 0:  # re-asked with the error; the re-ask succeeds
            self.injected["malformed"] += 1
            return Reply("Sure! Here is the JSON: {not json", delay=self._delay(text))
        body = json.dumps(request["messages"], sort_keys=True)
        with self.lock:
            new = body not in self.seen
            self.seen.add(body)
        if new and sum(text.encode()) % 7 == 0:
            self.injected["500"] += 1
            return Reply(status=500)
        return Reply(script(request), delay=self._delay(text))

    def _delay(self, text: str) -> float:
        with self.lock:
            self.arrivals += 1
            return self.delay + self.spread * (self.arrivals % 8)


@pytest.fixture(scope="module")
def replies() -> Replies:
    return Replies()


@pytest.fixture(scope="module")
def server(replies: Replies) -> Iterator[Any]:
    with serve_openai(replies) as stub:
        yield stub


@pytest.fixture(scope="module")
def config(server: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = small_config(server.base_url, Path("unused"), timeout=5.0)
    cfg["personas"]["count"] = 8
    cfg["questions"]["domains"][0].update(generate=20, per_request=4)  # 5 batches
    cfg["labels"].update(per_user=12, pair_pool=30)
    path = tmp_path_factory.mktemp("synth") / "synth.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [*FSPO, "synth", "run", str(config), "--out", str(out), "--no-progress"]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(config: Path, replies: Replies, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    done = _run(config, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(replies.injected.values()), replies.injected  # the client had failures to survive
    return out


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in NOT_COMPARED}  # fmt: skip


# (stage, its append log, lines written before the kill, lines when finished)
KILLS = [
    ("personas", "personas/personas.jsonl", 2, 8),
    ("questions", "questions/batches.jsonl", 2, 5),
    ("answers", "answers/answers.jsonl", 4, 17),
    ("labels", "labels/labels.jsonl", 20, 8 * 12),
]


@pytest.mark.parametrize(("stage", "log", "at", "total"), KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_mid_stage_then_rerun_gives_the_same_files(
    config: Path, uninterrupted: Path, tmp_path: Path, stage: str, log: str, at: int, total: int
) -> None:
    assert _lines(uninterrupted / log) == total
    for attempt in range(3):  # a loaded machine may still let the stage finish before the kill lands
        out = tmp_path / f"out{attempt}"
        cmd = [*FSPO, "synth", "run", str(config), "--out", str(out), "--no-progress"]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _lines(out / log) < at:
            assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        if _lines(out / log) < total and not (out / stage / "_stage.json").exists():
            break
    assert _lines(out / log) < total and not (out / stage / "_stage.json").exists()  # killed mid-stage

    done = _run(config, out)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = _files(out), _files(uninterrupted)
    assert got.keys() == want.keys()
    card, want_card = (json.loads(files.pop("card.json")) for files in (got, want))
    assert {k: v for k, v in card.items() if k != "client_totals"} == {
        k: v for k, v in want_card.items() if k != "client_totals"
    }
    for name in want:
        assert got[name] == want[name], name
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in runs] == ["finished"]  # the killed run could not log; the rerun did
