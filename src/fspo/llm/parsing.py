"""Structured output: find the JSON object in a model's reply and validate it with pydantic.

`ParseError` is what every reply parser given to `LLMClient.ask` raises: its message is sent back
to the model in the re-ask.

Models wrap JSON in code fences, prepend "Sure! Here it is:", or trail a remark. We take the first
balanced `{...}` that parses; the error message of a failure is written to be sent back to the
model in a re-ask ("missing field 'preferred'"), so it is short and concrete.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

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
