"""A server's log, said in an error: its last lines."""

from __future__ import annotations

from pathlib import Path


def tail(log: Path, lines: int = 15) -> str:
    """The last `lines` lines of `log` (a file a started server writes), or "(no output)"."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"
