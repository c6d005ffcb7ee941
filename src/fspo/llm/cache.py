"""The request cache: every finished LLM request, keyed by a hash of (stage, prompt, model, params).

Every caller of `LLMClient` (synth stages, LLM judges) caches through it, so a re-run or a resume
never sends a request whose response is stored, and usage is summed from one place.

Why sqlite and not an in-memory set over a JSONL log: at the paper's scale (10^6 preferences, each
judged in both orders, so several million requests) a Python set of keys alone takes hundreds of MB,
and a resume would need the *responses* of finished requests too, not only their keys. sqlite keeps
both on disk behind a B-tree index: constant memory, a lookup in microseconds, and each insert is
its own transaction, so a `kill -9` leaves every committed response and nothing half-written (WAL
mode; `synchronous=NORMAL` survives a killed process, only a power cut may lose the last few
responses, which are then simply asked again). It ships with Python: no dependency.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError
from fspo.llm.backends import Completion


def request_key(
    stage: str, messages: list[dict[str, str]], model: str, params: dict[str, Any], sample: str
) -> str:
    """A stable hash of everything that determines a response (`sample` tells apart repeats)."""
    blob = json.dumps(
        {"stage": stage, "messages": messages, "model": model, "params": params, "sample": sample},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit: one insert, one commit. Any thread may use it, one at a time: a client's requests
        # run on one event loop, which a judge keeps in a thread of its own (`fspo.eval.judges`).
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, stage TEXT NOT NULL,"
                " text TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,"
                " cost REAL NOT NULL,"
                " created REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise UserError(f"{self.path}: not a request cache (an SQLite file): {err}") from err

    def get(self, key: str) -> Completion | None:
        row = self._db.execute(
            "SELECT text, prompt_tokens, completion_tokens FROM responses WHERE key = ?", (key,)
        ).fetchone()
        return Completion(*row) if row else None

    def put(self, key: str, stage: str, completion: Completion, cost: float) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                stage,
                completion.text,
                completion.prompt_tokens,
                completion.completion_tokens,
                cost,
                time.time(),
            ),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def usage_by_stage(self) -> dict[str, dict[str, float]]:
        """Tokens and cost of every response ever received, across all runs and resumes."""
        rows = self._db.execute(
            "SELECT stage, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost)"
            " FROM responses GROUP BY stage ORDER BY stage"
        ).fetchall()
        return {
            stage: {"requests": n, "prompt_tokens": pt, "completion_tokens": ct, "cost": round(cost, 6)}
            for stage, n, pt, ct, cost in rows
        }

    def close(self) -> None:
        self._db.close()
