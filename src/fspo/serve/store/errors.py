"""What the store refuses, each error naming the input at fault so that the API can say which field."""

from __future__ import annotations

from fspo.core.errors import DataError, UserError


class StoreError(UserError):
    """A request the store refuses; `field` names the input at fault, if any (the API's `param`)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFound(StoreError):
    """The row does not exist *for this caller* (another user's row is reported the same way)."""


class Conflict(StoreError):
    """The write would break a uniqueness rule: a second trial for a question, a second vote."""


class InvalidRecord(DataError):
    """Bad input text. `field` is the field name (``rejected``), `index` the position in the batch."""

    def __init__(
        self,
        message: str,
        problems: list[str] | None = None,
        *,
        field: str | None = None,
        index: int | None = None,
    ):
        super().__init__(message, problems)
        self.field = field
        self.index = index
