"""kill -9 in the middle of `fspo synth run` (twice), resume: same records, nothing lost or repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from fspo.synth.config import SynthConfig
from fspo.synth.pipeline import run_pipeline
from fspo.testing import Reply, serve_openai
from synth_script import Flaky
from test_synth_pipeline import small_config

FSPO = [sys.executable, "-c", "from fspo.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
OUTPUTS = ["users.jsonl", "preferences.jsonl", "labels/labels.jsonl", "answers/answers.jsonl",
           "personas/personas.jsonl", "questions/questions.jsonl"]  # fmt: skip


class Recording:
    """Wraps a responder; counts each request body that was answered successfully (HTTP 200)."""

    def __init__(self, inner: Any, delay: float):
        self.inner, self.delay = inner, delay
        self.answered: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> Any:
        reply = self.inner(request)
        if isinstance(reply, Reply):
            return reply
        with self.lock:
            self.answered[json.dumps(request["messages"], sort_keys=True)] += 1
        return Reply(reply, delay=self.delay)


def _config(base_url: str, out: Path) -> dict[str, Any]:
    cfg = small_config(base_url, out, timeout=5.0)
    cfg["personas"]["count"] = 6
    cfg["labels"]["per_user"] = 12
    return cfg


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _run_until(cfg_path: Path, watch: Path, lines: int) -> None:
    """Start `fspo synth run`; kill -9 it once `watch` has `lines` lines (it must not finish first)."""
    proc = subprocess.Popen([*FSPO, "synth", "run", str(cfg_path), "--no-progress"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while _lines(watch) < lines:
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_twice_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    with serve_openai(Recording(Flaky(every=9), delay=0.01)) as server:
        run_pipeline(SynthConfig.model_validate(_config(server.base_url, tmp_path / "ref")), progress=False)

    rec = Recording(Flaky(every=9), delay=0.02)
    with serve_openai(rec) as server:
        out = tmp_path / "resumed"
        cfg_path = tmp_path / "synth.yaml"
        cfg_path.write_text(yaml.safe_dump(_config(server.base_url, out)))
        _run_until(cfg_path, out / "answers" / "answers.jsonl", 2)
        killed_in_answers = _lines(out / "answers" / "answers.jsonl")
        _run_until(cfg_path, out / "labels" / "labels.jsonl", 15)
        killed_in_labels = _lines(out / "labels" / "labels.jsonl")
        proc = subprocess.run([*FSPO, "synth", "run", str(cfg_path), "--no-progress"], env=ENV,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    total_labels = _lines(out / "labels" / "labels.jsonl")
    assert killed_in_answers >= 2  # killed after (or, on a loaded machine, just at the end of) answers
    assert 15 <= killed_in_labels < total_labels == 6 * 12
    for name in OUTPUTS:  # the very same records, in the same order: none lost, none duplicated
        assert (out / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    # No finished request was sent again: only those in flight at a kill (<= max_concurrency each).
    repeated = sum(n - 1 for n in rec.answered.values())
    assert repeated <= 2 * 4, repeated
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in runs] == ["finished"]  # killed runs could not log; the resume did
    assert runs[0]["client"]["succeeded"] < sum(rec.answered.values())  # the resume did only the rest
