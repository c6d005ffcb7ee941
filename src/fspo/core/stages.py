"""Cached pipeline stages: run a stage once, skip it next time unless its inputs changed.

Each stage writes into its own folder (`Stage`) and, only when it has finished, an atomic
`_stage.json` marker holding a fingerprint of the stage's inputs (its parameters and the
fingerprints of the stages it reads). A stage whose marker matches is skipped; a stage killed midway
has no marker and runs again, resuming from what it left: a long stage resumes internally (training
from its checkpoints, generation and the synth stages from their append logs). Changing any input
upstream changes every downstream fingerprint, so stale results are never reused: a stage also
records the fingerprint it started with (`_started.json`), and its folder is emptied before it runs
under any other one (a finished run of other inputs, or one killed midway), so that a resume only
ever continues the same configuration.

Two ways to drive it: `StageRunner` runs named synchronous stages under one folder (the quickstart);
`Stage` and `run_ordered` are the parts for stages that compute their own fingerprints and stream
their items to an append log (`fspo synth`).

Why hand-written: it is a dozen lines of policy (fingerprint + marker) that a workflow engine would
bring in hundreds of dependencies for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from fspo.core.files import AppendLog, atomic_write_json

MARKER = "_stage.json"
STARTED = "_started.json"

T = TypeVar("T")
R = TypeVar("R")


def fingerprint(params: Any) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


class Stage:
    """The folder `root/name` of one stage run under the inputs whose fingerprint is `fingerprint`."""

    def __init__(self, root: Path, name: str, fingerprint: str):
        self.name = name
        self.path = root / name
        self.fingerprint = fingerprint

    def marker(self) -> dict[str, Any] | None:
        """The finished marker, whatever inputs it was made from (None if the stage never finished)."""
        return _read_json(self.path / MARKER)

    def done(self) -> dict[str, Any] | None:
        """The marker of a finished run with the same fingerprint, else None."""
        marker = self.marker()
        return marker if marker and marker.get("fingerprint") == self.fingerprint else None

    def begin(self, fresh: bool = False) -> Path:
        """Ready the folder to run in: what a killed run of the same inputs left stays (to resume from);
        anything else (a finished run, other inputs, or everything when `fresh`) is removed first."""
        started = _read_json(self.path / STARTED) or {}
        if self.path.exists() and (fresh or self.marker() or started.get("fingerprint") != self.fingerprint):
            shutil.rmtree(self.path)  # another configuration's outputs: resuming from them would mix runs
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / STARTED, {"stage": self.name, "fingerprint": self.fingerprint})
        return self.path

    def open_log(self, filename: str) -> tuple[AppendLog, int]:
        """The stage's append log (call `begin` first) and how many items it already holds."""
        log = AppendLog(self.path / filename, sync_every=256)  # a kill loses no flushed line; fsync batched
        return log, sum(1 for _ in log.read())

    def finish(self, summary: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Write the marker (`summary`, what the stage reports, plus `extra` facts); returns `summary`."""
        atomic_write_json(
            self.path / MARKER,
            {"stage": self.name, "fingerprint": self.fingerprint, **extra, "summary": summary},
        )
        return summary


async def run_ordered(
    items: Iterable[T],
    work: Callable[[T], Awaitable[R]],
    emit: Callable[[R], None],
    window: int,
) -> None:
    """Run `work` on up to `window` items at once; `emit` the results in item order.

    Emitting in item order, not completion order, makes a stage's append log a prefix of the final
    one at any kill: its line count is the number of items done, and a resume skips that many. The
    window bounds memory (results waiting for a slow predecessor) and the number of tasks; the real
    concurrency limit is the LLM client's. If any item raises, the others are cancelled and the
    exception propagates (lines already emitted stay: they are complete).
    """
    pending: deque[asyncio.Task[R]] = deque()
    try:
        for item in items:
            pending.append(asyncio.ensure_future(work(item)))
            if len(pending) >= window:
                emit(await pending.popleft())
        while pending:
            emit(await pending.popleft())
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


@dataclass
class StageRunner:
    """Runs named stages under `root`, each cached by its fingerprint; records wall times."""

    root: Path
    force: bool = False
    console: Console = field(default_factory=Console)
    timings: dict[str, float] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        return self.root / name

    def marker(self, name: str) -> dict[str, Any] | None:
        return _read_json(self.folder(name) / MARKER)

    def run(
        self,
        name: str,
        params: dict[str, Any],
        fn: Callable[[Path], dict[str, Any] | None],
        depends: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Run `fn(folder)` unless a finished marker with the same fingerprint exists.

        Returns the stage's summary (what `fn` returned, stored in the marker).
        """
        upstream = {d: (self.marker(d) or {}).get("fingerprint") for d in depends}
        stage = Stage(self.root, name, fingerprint({"params": params, "upstream": upstream}))
        done = stage.done()
        if done and not self.force:
            self.console.print(f"[dim]• {name}: cached ({done.get('seconds', 0):.0f} s when it ran)[/]")
            self.timings[name] = 0.0
            return done.get("summary") or {}
        folder = stage.begin(fresh=self.force)
        self.console.rule(f"[bold]{name}")
        start = time.perf_counter()
        summary = fn(folder) or {}
        seconds = time.perf_counter() - start
        self.timings[name] = seconds
        stage.finish(summary, params=params, seconds=seconds)
        self.console.print(f"[green]✓ {name}[/] in {seconds:.0f} s")
        return summary
