"""Stage folders and the ordered, resumable work loop every LLM stage runs.

A stage turns a deterministic sequence of *items* (a persona index, a question, a (user, pair)) into
exactly one output line each, appended to `<stage>/<file>.jsonl` (an `AppendLog`). Items run
concurrently but their lines are written **in item order** (a small reorder window), so after a kill
the log is always a prefix: line count = items finished, and a resume skips that many items. Items
that were in flight at the kill are redone, but the responses they had already received come from
the request cache, so no finished request is sent twice. Because the order does not depend on
timing, a resumed run writes the very same files as an uninterrupted one.

`_done.json` is written atomically when a stage finishes, with the stage's fingerprint (its config,
prompts, model and upstream fingerprints): a finished stage whose fingerprint still matches is
skipped; a changed one is redone from the cache, re-asking only the requests that changed.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from fspo.core.files import AppendLog, atomic_write_json

T = TypeVar("T")
R = TypeVar("R")

DONE = "_done.json"
STARTED = "_started.json"


class StageDir:
    def __init__(self, root: Path, name: str, fingerprint: str):
        self.name = name
        self.path = root / name
        self.fingerprint = fingerprint

    def done(self) -> dict[str, Any] | None:
        """The summary of a finished stage with the same fingerprint, else None."""
        marker = self.path / DONE
        if not marker.exists():
            return None
        data = json.loads(marker.read_text())
        return data if data.get("fingerprint") == self.fingerprint else None

    def open_log(self, filename: str) -> tuple[AppendLog, int]:
        """The stage's append log and how many items it already holds (0 if its inputs changed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        started = self.path / STARTED
        log_path = self.path / filename
        same = started.exists() and json.loads(started.read_text()).get("fingerprint") == self.fingerprint
        if not same:
            (self.path / DONE).unlink(missing_ok=True)
            log_path.unlink(missing_ok=True)
            atomic_write_json(started, {"fingerprint": self.fingerprint})
        log = AppendLog(log_path, sync_every=256)  # a killed process loses no flushed line; fsync batched
        return log, sum(1 for _ in log.read())

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        data = {"fingerprint": self.fingerprint, **summary}
        atomic_write_json(self.path / DONE, data)
        return data


async def run_ordered(
    items: Iterable[T],
    work: Callable[[T], Awaitable[R]],
    emit: Callable[[R], None],
    window: int,
) -> None:
    """Run `work` on up to `window` items at once; `emit` the results in item order.

    The window bounds memory (results waiting for a slow predecessor) and the number of tasks; the
    real concurrency limit is the client's. If any item raises, the others are cancelled and the
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
