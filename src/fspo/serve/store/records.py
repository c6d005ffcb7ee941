"""The records the store takes in and hands out (pydantic, frozen), and what a database can hold.

Rows never leave the store: every method answers with these records, so a caller cannot touch a
session or lazy-load a column after its transaction ended.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fspo.data.schema import Preference
from fspo.data.validate import storable_problems
from fspo.serve.store.errors import InvalidRecord

# A study participant's key has the "study" scope: it reaches the study's routes only, so no participant
# can ask a compared system by name or list the systems (`fspo.serve.auth`).
Scope = Literal["user", "admin", "study"]
Vote = Literal["left", "right", "tie"]
Label = Literal["a", "b", "none"]
SCOPES: tuple[str, ...] = ("user", "admin", "study")
LABELS: tuple[str, ...] = ("a", "b", "none")
VOTES: tuple[str, ...] = ("left", "right", "tie")


def storable(value: Any, where: str = "") -> Any:
    """`value` unchanged if every database stores it faithfully, else a `ValueError` naming where in it
    (`where`: the field) what is not: `fspo.data.validate.storable_problems`, the rule `fspo data
    validate` applies to files, so a record the validator passes is one the store takes."""
    problems = storable_problems(value, where)
    if problems:
        raise ValueError("; ".join(problems))
    return value


def require_text(name: str, value: Any) -> str:
    """`value` when it is a non-blank string, else an `InvalidRecord` naming field `name`."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(f"{name}: must be a non-empty string", field=name)
    return value


class _Out(BaseModel):
    """A record handed out; one whose fields are its row's columns by name is read off the row
    (``Trial.model_validate(row)``), so each field is listed once, here."""

    model_config = ConfigDict(frozen=True, from_attributes=True)


class NewPreference(BaseModel):
    """A preference as a user submits it: the user is the caller (from its key), never a field.

    Valid exactly when the core record (`fspo.data.schema.Preference`) with the caller's id is, so the
    store and the API accept what training data accepts, with each refusal at its field (``rejected``),
    and when a database can hold it (`storable`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    question: str
    chosen: str
    rejected: str
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("*")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> Any:
        return storable(value, info.field_name or "")

    @model_validator(mode="after")
    def _core_rules(self) -> NewPreference:
        # pydantic merges a ValidationError raised here into this model's, each error at its own field.
        Preference(user_id="caller", **self.model_dump())
        return self


class StoredPreference(_Out):
    id: int
    user_id: str
    question: str
    chosen: str
    rejected: str
    source: str
    created_at: datetime
    metadata: dict[str, Any]

    def record(self) -> Preference:
        """The project's core record, read off this one's fields of the same names (store bookkeeping,
        id/source/time, stays out of it)."""
        return Preference.model_validate(self, from_attributes=True)


class KeyInfo(_Out):
    id: str
    user_id: str
    scope: Scope
    name: str
    created_at: datetime
    revoked_at: datetime | None


class Principal(_Out):
    user_id: str
    scope: Scope
    key_id: str


class Trial(_Out):
    id: int
    participant: str
    question: str
    left_system: str
    right_system: str
    left_answer: str
    right_answer: str
    vote: Vote | None
    created_at: datetime
    voted_at: datetime | None


class Participant(_Out):
    user_id: str
    seat: int
    created_at: datetime


class StudyLabel(_Out):
    participant: str
    pair_id: int
    choice: Label
    preference_id: int | None
    created_at: datetime


class Event(_Out):
    id: int
    user_id: str | None
    kind: str
    payload: dict[str, Any]
    created_at: datetime
