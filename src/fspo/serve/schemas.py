"""Request bodies of the serving API: OpenAI's chat/completions fields, FSPO's options, preferences.

Why pydantic models with ``extra="forbid"``: a misspelt or unsupported option (``n_shots``,
``logprobs``) must be refused with its name, not silently ignored, since the answer would then not
be the one the caller asked for. The OpenAI fields the official client sends are all accepted;
those this server cannot honour (``n`` > 1, non-zero penalties) are refused by name too.
Limits that depend on the server's configuration (a backend's token limit, the shot cap) are
checked by the app, which knows them. A preference's body is the store's `NewPreference`, valid
exactly when the core record is.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fspo.serve.store import NewPreference, storable

# Integers the database and the generator can hold: a larger one (2**70) is refused with its field's
# name instead of overflowing the SQL integer or the sampler's seed (a 500).
INT64_MAX = 2**63 - 1
RowId = Annotated[int, Field(ge=1, le=INT64_MAX)]  # a preference's or a trial's id
Seed = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]  # OpenAI's range for `seed`
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
StoredText = Annotated[str, AfterValidator(storable)]


class Body(BaseModel):
    """A request body: unknown fields are errors that name the field."""

    model_config = ConfigDict(extra="forbid")


class TextPart(Body):
    """One part of a message's content; only text parts exist for a text model."""

    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Body):
    include_usage: bool = False


class GenerationBody(Body):
    """Fields shared by chat completions and completions, plus FSPO's own options."""

    model: str | None = None  # a served system's name; None: the server's default system
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    # Greedy by default (OpenAI's default is 1.0) so that the same shots and question give the same answer.
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    user: str | None = None  # accepted for compatibility, never used: the caller is the API key's user
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # FSPO: which of the caller's stored preferences become the episode's shots, and how to answer.
    shots: Count | None = None  # the newest N (default: the system's number)
    preference_ids: list[RowId] | None = None  # exactly these of the caller's preferences
    mode: Literal["plain", "rat"] | None = None  # None: the model's trained mode

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (one answer per request)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported (only 0)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stop

    @field_validator("preference_ids")
    @classmethod
    def _ids(cls, ids: list[int] | None, info: ValidationInfo) -> list[int] | None:
        # A field validator (not a model one) so that the error names 'preference_ids'.
        if ids is None:
            return None
        if info.data.get("shots") is not None:
            raise ValueError("give either shots or preference_ids, not both")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct")
        return ids

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _ends_with_question(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        # The question is the last message, a user's: answering an earlier one would silently drop it.
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's question (role 'user')")
        if not messages[-1].text().strip():
            raise ValueError("the last message (the question) must not be empty")
        return messages

    @property
    def question(self) -> str:
        return self.messages[-1].text()


class CompletionRequest(GenerationBody):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request")
        if not (prompt if isinstance(prompt, str) else prompt[0]).strip():
            raise ValueError("must not be empty or whitespace only")
        return prompt

    @property
    def question(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class PreferenceBatch(Body):
    preferences: list[NewPreference] = Field(min_length=1)


class NewKey(Body):
    """An admin's request for a key: it acts as `user_id` (created if new)."""

    user_id: StoredText = Field(min_length=1, max_length=200)
    scope: Literal["user", "admin"] = "user"
    name: StoredText = Field("", max_length=200)
