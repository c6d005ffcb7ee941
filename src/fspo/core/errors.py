"""User-facing errors.

A `UserError` is a mistake in the user's input (a file, a config field, a model id): the CLI prints
its message as one line and exits with status 2, without a traceback. Everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message must say what is wrong and where (file, line, field)."""


class DataError(UserError):
    """A data file has bad records. `problems` lists every one as 'file:line: field: message'."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or []
        shown = "\n".join(f"  {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(message + (f"\n{shown}{more}" if self.problems else ""))
