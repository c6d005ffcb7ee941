"""Cached pipeline stages: run a stage once, skip it next time unless its inputs changed.

Each stage writes into its own folder and, only when it has finished, an atomic `_stage.json`
marker holding a fingerprint of the stage's parameters (and of the markers of the stages it reads).
A stage whose marker matches is skipped; a stage killed midway has no marker and runs again
(stages that are long resume internally: training from its checkpoints, generation from its
append log). Changing any parameter upstream changes every downstream fingerprint, so stale results
are never reused: a stage also records the fingerprint it started with (`_started.json`), and its
folder is emptied before it runs under any other one (a finished run of other inputs, or one killed
midway), so that internal resume only ever continues the same configuration.

Why hand-written: it is a dozen lines of policy (fingerprint + marker) that a workflow engine would
bring in hundreds of dependencies for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fspo.core.files import atomic_write_json

MARKER = "_stage.json"
STARTED = "_started.json"


def fingerprint(params: Any) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageRunner:
    """Runs named stages under `root`, each cached by its fingerprint; records wall times."""

    root: Path
    force: bool = False
    console: Console = field(default_factory=Console)
    timings: dict[str, float] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        return self.root / name

    def marker(self, name: str, file: str = MARKER) -> dict[str, Any] | None:
        path = self.folder(name) / file
        if not path.exists():
            return None
        return json.loads(path.read_text())

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
        fp = fingerprint({"params": params, "upstream": upstream})
        done = self.marker(name)
        if done and done.get("fingerprint") == fp and not self.force:
            self.console.print(f"[dim]• {name}: cached ({done.get('seconds', 0):.0f} s when it ran)[/]")
            self.timings[name] = 0.0
            return done.get("summary") or {}
        folder = self.folder(name)
        started = self.marker(name, STARTED) or {}
        if folder.exists() and (done or self.force or started.get("fingerprint") != fp):
            shutil.rmtree(folder)  # another configuration's outputs: resuming from them would mix runs
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / STARTED, {"stage": name, "fingerprint": fp})
        self.console.rule(f"[bold]{name}")
        start = time.perf_counter()
        summary = fn(folder) or {}
        seconds = time.perf_counter() - start
        self.timings[name] = seconds
        atomic_write_json(
            folder / MARKER,
            {"stage": name, "fingerprint": fp, "params": params, "seconds": seconds, "summary": summary},
        )
        self.console.print(f"[green]✓ {name}[/] in {seconds:.0f} s")
        return summary
