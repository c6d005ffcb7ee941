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

A finished stage is only as good as its files: the marker also records the size and sha256 of every
file the stage wrote (`outputs`), and a stage is "cached" only when each is still there with the same
bytes; a missing, truncated or edited file re-runs the stage and says which file (`Stage.check`). Files
added to a stage folder after it finished (the reference log-prob sidecars training writes beside the
episodes) are not the stage's outputs and are neither checked nor a reason to re-run. A marker from
before the hashes existed cannot be verified, so its stage re-runs rather than adopting whatever files
are there now: adopting would bless exactly the damage the check is for (a file cut in half before the
upgrade).

A downstream stage's fingerprint holds its upstream stages' *input* fingerprints, so it stays the same
when an upstream stage merely re-runs; its marker also records a digest of each upstream stage's
outputs (`upstream_outputs`), and it re-runs when those differ. So an upstream stage that re-ran and
wrote the same bytes (sim, episodes, generation: deterministic) leaves its downstream cached, and one
whose files came out different (a training stage's metrics carry wall times) re-runs its downstream.

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
from rich.markup import escape

from fspo.core.files import AppendLog, atomic_write_json

MARKER = "_stage.json"
STARTED = "_started.json"
_BOOKKEEPING = frozenset({MARKER, STARTED})

T = TypeVar("T")
R = TypeVar("R")


def fingerprint(params: Any) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None if there is none or it is not readable JSON (markers are written
    atomically, so a damaged one was damaged by hand: `Stage.check` says so and re-runs the stage)."""
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def output_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {"bytes", "sha256"}}` of every regular file under `folder` but the markers."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink())
    return {
        rel: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in files
        if (rel := path.relative_to(folder).as_posix()) not in _BOOKKEEPING
    }


def outputs_digest(outputs: dict[str, Any]) -> str:
    """One hash of a stage's recorded outputs: what a downstream marker remembers of its upstream."""
    return fingerprint(outputs)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n} bytes"


class Stage:
    """The folder `root/name` of one stage run under the inputs whose fingerprint is `fingerprint`.

    `depends` names the stages (folders under `root`) whose outputs this one reads: their output
    digests (as their markers record them) are recorded at `finish` and must be unchanged for `check`
    to say cached. Check (or re-run) those stages first, as `StageRunner` does by running in order:
    this one trusts their markers.
    """

    def __init__(self, root: Path, name: str, fingerprint: str, depends: tuple[str, ...] = ()):
        self.root = root
        self.name = name
        self.path = root / name
        self.fingerprint = fingerprint
        self.depends = depends

    def marker(self) -> dict[str, Any] | None:
        """The finished marker, whatever inputs it was made from (None if the stage never finished)."""
        return _read_json(self.path / MARKER)

    def _upstream_digests(self) -> dict[str, str | None]:
        digests: dict[str, str | None] = {}
        for dep in self.depends:
            outputs = (_read_json(self.root / dep / MARKER) or {}).get("outputs")
            digests[dep] = None if outputs is None else outputs_digest(outputs)
        return digests

    def check(self) -> tuple[dict[str, Any] | None, str | None]:
        """`(marker, None)` if a run with this fingerprint finished and its outputs are intact; else
        `(None, why)`: `why` is one line naming what failed the check, or None when there is nothing to
        check (the stage never finished, or finished under other inputs)."""
        marker = self.marker()
        if marker is None and (self.path / MARKER).exists():
            return None, f"{self.path / MARKER} is not a JSON object"
        if not marker or marker.get("fingerprint") != self.fingerprint:
            return None, None
        outputs = marker.get("outputs")
        if not isinstance(outputs, dict):
            return None, f"{self.path / MARKER} has no output hashes (an older fspo wrote it): not verifiable"
        for rel, want in outputs.items():
            path = self.path / rel
            if not path.is_file():
                return None, f"{path} is missing"
            size = path.stat().st_size
            if size != want["bytes"]:
                how = "was truncated to" if size < want["bytes"] else "grew to"
                return None, f"{path} {how} {_size(size)} (the stage wrote {_size(want['bytes'])})"
            if _sha256(path) != want["sha256"]:
                return None, f"{path} was edited since the stage wrote it (same size, other bytes)"
        used = marker.get("upstream_outputs", {})
        for dep, digest in self._upstream_digests().items():
            if used.get(dep) != digest:
                return None, f"{self.root / dep} holds other outputs than the ones this stage was made from"
        return marker, None

    def done(self) -> dict[str, Any] | None:
        """The marker of a finished run with the same fingerprint and intact outputs, else None (and
        why it is not cached, when a marker failed the check, is printed to stderr)."""
        marker, why = self.check()
        if why:
            Console(stderr=True, soft_wrap=True).print(f"{self.name}: re-running: {why}", markup=False)
        return marker

    def begin(self, fresh: bool = False) -> Path:
        """Ready the folder to run in: what a killed run of the same inputs left stays (to resume from);
        anything else (a finished run, other inputs, or everything when `fresh`) is removed first."""
        started = _read_json(self.path / STARTED) or {}
        finished = (self.path / MARKER).exists()
        if self.path.exists() and (fresh or finished or started.get("fingerprint") != self.fingerprint):
            shutil.rmtree(self.path)  # another configuration's outputs: resuming from them would mix runs
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / STARTED, {"stage": self.name, "fingerprint": self.fingerprint})
        return self.path

    def open_log(self, filename: str) -> tuple[AppendLog, int]:
        """The stage's append log (call `begin` first) and how many items it already holds."""
        log = AppendLog(self.path / filename, sync_every=256)  # a kill loses no flushed line; fsync batched
        return log, sum(1 for _ in log.read())

    def finish(self, summary: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Write the marker (`summary`, what the stage reports, plus `extra` facts, the hashes of the
        files in the stage folder and the digests of its upstream stages' outputs); returns `summary`."""
        atomic_write_json(
            self.path / MARKER,
            {
                "stage": self.name,
                "fingerprint": self.fingerprint,
                **extra,
                "summary": summary,
                "outputs": output_hashes(self.path),
                "upstream_outputs": self._upstream_digests(),
            },
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
        stage = Stage(self.root, name, fingerprint({"params": params, "upstream": upstream}), depends)
        done, why = stage.check() if not self.force else (None, None)
        if done:
            self.console.print(f"[dim]• {name}: cached ({done.get('seconds', 0):.0f} s when it ran)[/]")
            self.timings[name] = 0.0
            return done.get("summary") or {}
        if why:
            self.console.print(f"[yellow]• {name}: re-running:[/] {escape(why)}", soft_wrap=True)
        folder = stage.begin(fresh=self.force)
        self.console.rule(f"[bold]{name}")
        start = time.perf_counter()
        summary = fn(folder) or {}
        seconds = time.perf_counter() - start
        self.timings[name] = seconds
        stage.finish(summary, params=params, seconds=seconds)
        self.console.print(f"[green]✓ {name}[/] in {seconds:.0f} s")
        return summary
