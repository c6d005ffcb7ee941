"""The replies the synth prompts ask for, as pydantic models (`fspo.llm.parse_reply` finds the JSON
object in a reply and validates it with one of them; a failure is re-asked with the error).

`extra="ignore"`: a model that adds a remark field still gave a usable reply.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fspo.synth.config import TraitDimension


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
