"""Structured output: find the JSON object in a model's reply and validate it with pydantic.

Models wrap JSON in code fences, prepend "Sure! Here it is:", or trail a remark. We take the first
balanced `{...}` that parses; the error message of a failure is written to be sent back to the
model in a re-ask ("missing field 'preferred'"), so it is short and concrete.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fspo.synth.config import TraitDimension

M = TypeVar("M", bound=BaseModel)


class ParseError(ValueError):
    pass


def _objects(text: str) -> list[str]:
    """Candidate `{...}` spans, outermost first, scanning braces outside of strings."""
    spans, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    return spans


def parse_reply(text: str, schema: type[M]) -> M:
    """The first JSON object in `text` that `schema` accepts; `ParseError` says why none did."""
    candidates = _objects(text)
    if not candidates:
        raise ParseError("no JSON object found in the reply")
    last: str = ""
    for cand in candidates:
        try:
            data: Any = json.loads(cand)
        except json.JSONDecodeError as err:
            last = f"invalid JSON ({err.msg} at char {err.pos})"
            continue
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(str(p) for p in e["loc"]) or "object"
            last = f"field {where!r}: {e['msg']}"
    raise ParseError(last)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TraitsReply(_Reply):
    traits: list[TraitDimension] = Field(min_length=1)


class DescriptionReply(_Reply):
    description: str = Field(min_length=10)


class CheckReply(_Reply):
    specific: bool
    missing: str = ""


class QuestionsReply(_Reply):
    questions: list[str] = Field(min_length=1)


class ViewpointsReply(_Reply):
    viewpoints: list[str] = Field(min_length=2)


class AnswerReply(_Reply):
    answer: str = Field(min_length=1)


class JudgeReply(_Reply):
    preferred: Literal["A", "B"]

    @field_validator("preferred", mode="before")
    @classmethod
    def _letter(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().strip(".").upper()
            if v in ("ANSWER A", "ANSWER B"):
                v = v[-1]
        return v
