"""The core records of fspo: `Preference`, `User`, `Episode`.

Every stage speaks these (simulation, synthetic data, import, episodes, training, evaluation,
serving); none invents a parallel dict format. They are pydantic models so that a bad record is
rejected at the boundary with the name of the offending field, and so that they round-trip through
JSON (one record per JSONL line) and through `datasets` (Parquet/Arrow) unchanged.

`metadata` is a free-form JSON object carried along untouched: the simulator stores traits and
viewpoints there, importers store the original columns (e.g. `level_x`), so nothing is lost.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

NonEmpty = Field(min_length=1)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    @field_validator("*", mode="after")
    @classmethod
    def _strings_not_blank(cls, value: Any, info: Any) -> Any:
        # Whitespace-only strings are as empty as "" for every text field of these records.
        if isinstance(value, str) and info.field_name != "description" and not value.strip():
            raise ValueError("must not be empty or whitespace only")
        return value


class Preference(_Record):
    """One labeled comparison: for `question`, user `user_id` prefers `chosen` over `rejected`.

    `rejected_description`, when known, describes the persona the rejected answer was written for
    (a simulator's minimal pair flips one of the user's traits; the paper's ELIX and Review data name
    the rejected answer's level). RAT's rejected target carries it, as the official code's does, so
    the preference loss contrasts descriptions as well as answers.
    """

    user_id: str = NonEmpty
    question: str = NonEmpty
    chosen: str = NonEmpty
    rejected: str = NonEmpty
    rejected_description: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("rejected", mode="after")
    @classmethod
    def _answers_differ(cls, rejected: str, info: ValidationInfo) -> str:
        # A field validator (not a model one) so that the error names the field: 'rejected'.
        chosen = info.data.get("chosen")
        if isinstance(chosen, str) and chosen.strip() == rejected.strip():
            raise ValueError("chosen and rejected answers are identical")
        return rejected


class User(_Record):
    """A user (a task, in meta-learning terms). `description` feeds RAT targets and the oracle."""

    user_id: str = NonEmpty
    description: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Episode(_Record):
    """N labeled preferences of one user (the shots), then a new preference of the same user (the query).

    `description` is the user's true description when known (RAT targets, oracle prompts).
    `split` says where the episode's user and query come from: ``train``, ``test_seen`` (a held-out
    preference of a user seen in training) or ``test_unseen`` (a user never seen in training).
    """

    episode_id: str = NonEmpty
    user_id: str = NonEmpty
    shots: list[Preference]
    query: Preference
    description: str | None = None
    split: str = "train"
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_user(self) -> Episode:
        for i, pref in enumerate([*self.shots, self.query]):
            if pref.user_id != self.user_id:
                where = f"shots[{i}]" if i < len(self.shots) else "query"
                raise ValueError(f"{where}.user_id is {pref.user_id!r}, episode user is {self.user_id!r}")
        if any(_same_item(s, self.query) for s in self.shots):
            raise ValueError("the query also appears among its own shots")
        return self

    @property
    def num_shots(self) -> int:
        return len(self.shots)


def _same_item(a: Preference, b: Preference) -> bool:
    return (a.question, a.chosen, a.rejected) == (b.question, b.chosen, b.rejected)


RECORD_TYPES: dict[str, type[_Record]] = {"preference": Preference, "user": User, "episode": Episode}
