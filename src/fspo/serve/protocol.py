"""The serving API's types: every request body and every response body is one of these models.

Requests (`Body`): OpenAI's chat/completions fields, FSPO's options, preferences, keys. Two rules:
- ``extra="forbid"``: a misspelt or unsupported option (``n_shots``, ``logprobs``) is refused with its
  name, not silently ignored, since the answer would then not be the one the caller asked for. The
  OpenAI fields the official client sends are all accepted; those this server cannot honour (non-zero
  presence or frequency penalties) are refused by name too.
- ``strict=True``: a field's type is the protocol's, never coerced (``"max_tokens": "10"`` or
  ``"stream": "yes"`` is a 400 naming the field), as OpenAI's own server answers. An integer is still
  a number where the protocol says number (``"temperature": 1``).
Limits that depend on the server's configuration (a system's token limit, the shot cap) are checked
by the handlers (`fspo.serve.serving`), which know them. A preference's body is the store's
`NewPreference`, valid exactly when the core record is.

Responses (`Response`): what the routes return and the stream's events, each built by its own
constructor from the answer (``of``), so no route assembles a reply as a loose dict.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from fspo.data.schema import User
from fspo.data.validate import text_problems
from fspo.infer.generate import Decoding
from fspo.serve.answerers import Answer, Choices
from fspo.serve.store import Event, KeyInfo, NewPreference, StoredPreference, storable

# Integers the database and the generator can hold: a larger one (2**70) is refused with its field's
# name instead of overflowing the SQL integer or the sampler's seed (a 500).
INT64_MAX = 2**63 - 1
RowId = Annotated[int, Field(ge=1, le=INT64_MAX)]  # a preference's or a trial's id
Seed = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]  # OpenAI's range for `seed`
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
StoredText = Annotated[str, AfterValidator(storable)]


def _plain_text(text: str) -> str:
    # A lone surrogate cannot reach the tokenizer (it takes UTF-8), and a NUL is no character of any
    # question: both are refused at the field instead of failing the generation.
    problems = text_problems(text)
    if problems:
        raise ValueError(problems[0])
    return text


# A text of a request that the model reads (a message, a prompt, a stop sequence) or that names something.
Text = Annotated[str, AfterValidator(_plain_text)]

# ============================================================================================ requests


class Body(BaseModel):
    """A request body: unknown fields are errors that name the field; types are never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Body):
    """One part of a message's content; only text parts exist for a text model."""

    type: Literal["text"]
    text: Text


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

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

    model: Text | None = None  # a served system's name; None: the server's default system
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    # Greedy by default (OpenAI's default is 1.0) so that the same shots and question give the same answer.
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=INT64_MAX)  # answers returned
    # Samples ranked by the model's implicit reward, of which the n best are returned (OpenAI's
    # completions field; on chat too, as FSPO's). None: the n samples, unranked.
    best_of: int | None = Field(None, ge=1, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    user: Text | None = None  # accepted for compatibility, never used: the caller is the API key's user
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # FSPO: which of the caller's stored preferences become the episode's shots, and how to answer.
    shots: Count | None = None  # the newest N (default: the system's number)
    preference_ids: list[RowId] | None = None  # exactly these of the caller's preferences
    mode: Literal["plain", "rat"] | None = None  # None: the model's trained mode

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
    prompt: Text | list[Text]

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


# =========================================================================================== responses


class Response(BaseModel):
    """A response body."""

    model_config = ConfigDict(frozen=True)


class ErrorInfo(Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Response):
    """OpenAI's error shape (`fspo.serve.errors` says which status gets which type)."""

    error: ErrorInfo


class Health(Response):
    status: Literal["ok"] = "ok"


class ModelCard(Response):
    id: str  # the served system's name
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fspo"
    root: str  # the model behind it


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(Response):
    cached_tokens: int  # prompt tokens whose keys/values came from a prefix cache


class Usage(Response):
    """What a request cost: with ``n`` or ``best_of``, `completion_tokens` counts every sample generated
    (kept or not), and FSPO's `scored_tokens` the tokens best_of's scoring read (prompts and answers,
    through the model and its reference; 0 without ranking)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    scored_tokens: int = 0

    @classmethod
    def of(cls, answer: Answer | Choices, cut_off: int = 0) -> Usage:
        """The usage of `answer`, less `cut_off` completion tokens that a stop sequence cut off."""
        completion = answer.completion_tokens - cut_off
        return cls(
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=completion,
            total_tokens=answer.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=answer.cached_tokens),
            scored_tokens=answer.scored_tokens if isinstance(answer, Choices) else 0,
        )


class FspoInfo(Response):
    """FSPO's part of a completion: which of the caller's preferences were the shots, RAT's description,
    how tokens were chosen (the server's repetition controls with the request's sampling), and with
    ``best_of`` each choice's implicit reward against which reference (a run's name, or "self")."""

    description: str | None
    shots_used: int
    preference_ids: list[int]
    mode: str
    decoding: Decoding
    rewards: list[float] | None = None  # in choice order
    reference: str | None = None


class Head(Response):
    """What every response and chunk of one completion shares."""

    id: str
    created: int
    model: str  # the served system's name
    system_fingerprint: None = None


class CompletionResponse(Head):
    """A completion's response or streamed event. In a stream, `usage` is present only when the request
    asked for it (``stream_options.include_usage``: null until the last event, which carries it) and
    `fspo` only on the event that ends the answer; `event` writes it so."""

    usage: Usage | None = None
    fspo: FspoInfo | None = None

    def event(self, include_usage: bool) -> str:
        absent = ({"usage"} if not include_usage else set()) | ({"fspo"} if self.fspo is None else set())
        return f"data: {self.model_dump_json(exclude=absent)}\n\n"


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ResponseChoice(Response):
    """What every kind of choice shares: its place among the answers and OpenAI's `logprobs`, which
    this server never computes (a request asking for them is refused)."""

    index: int = 0
    finish_reason: str | None
    logprobs: None = None


class ChatChoice(ResponseChoice):
    message: AssistantMessage
    finish_reason: str  # a whole answer has always ended


Finished = tuple[str, str]  # a choice's text and finish reason


class AnswersResponse(CompletionResponse):
    """A response carrying whole answers: one choice a finished answer, in order (`choice` builds it)."""

    @classmethod
    def choice(cls, index: int, text: str, finish: str) -> ResponseChoice:
        raise NotImplementedError

    @classmethod
    def of(cls, head: Head, finished: list[Finished], usage: Usage, fspo: FspoInfo) -> Self:
        choices = [cls.choice(i, text, finish) for i, (text, finish) in enumerate(finished)]
        return cls(**dict(head), choices=choices, usage=usage, fspo=fspo)


class ChatCompletion(AnswersResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]

    @classmethod
    def choice(cls, index: int, text: str, finish: str) -> ChatChoice:
        return ChatChoice(index=index, message=AssistantMessage(content=text), finish_reason=finish)


class ChatDelta(Response):
    """The new part of a streamed chat answer; a field that is None is left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(ResponseChoice):
    delta: ChatDelta


class ChatCompletionChunk(CompletionResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]

    @classmethod
    def of(cls, head: Head, delta: str | None, finish: str | None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=ChatDelta(content=delta), finish_reason=finish)
        return cls(**dict(head), choices=[choice])

    @classmethod
    def opening(cls, head: Head) -> ChatCompletionChunk:
        """The first event: the assistant's role, before any text."""
        choice = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""), finish_reason=None)
        return cls(**dict(head), choices=[choice])


class CompletionChoice(ResponseChoice):
    text: str


class Completion(AnswersResponse):
    """A text completion; streamed, each event is one too (OpenAI's shape for both)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]

    @classmethod
    def choice(cls, index: int, text: str, finish: str) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, finish_reason=finish)

    @classmethod
    def chunk(cls, head: Head, delta: str | None, finish: str | None) -> Completion:
        return cls(**dict(head), choices=[CompletionChoice(text=delta or "", finish_reason=finish)])


class Me(Response):
    user_id: str
    preferences: int  # how many the caller has stored


class PreferenceObject(StoredPreference):
    object: Literal["preference"] = "preference"

    @classmethod
    def of(cls, stored: StoredPreference) -> PreferenceObject:
        return cls(**dict(stored))


class PreferenceList(Response):
    object: Literal["list"] = "list"
    data: list[PreferenceObject]

    @classmethod
    def of(cls, stored: list[StoredPreference]) -> PreferenceList:
        return cls(data=[PreferenceObject.of(p) for p in stored])


class PreferencePage(Response):
    object: Literal["list"] = "list"
    data: list[PreferenceObject]  # newest first
    has_more: bool
    next_before: int | None  # the `before` of the next page; None on the last


class DeletedPreference(Response):
    id: int
    object: Literal["preference"] = "preference"
    deleted: Literal[True] = True


class DeletedPreferences(Response):
    object: Literal["list"] = "list"
    deleted: int  # how many


class UserDescription(Response):
    object: Literal["user.description"] = "user.description"
    description: str | None  # None only when the model wrote an empty one
    model: str
    shots_used: int
    preference_ids: list[int]


class UserSummary(Response):
    user_id: str
    description: str | None
    metadata: dict[str, Any]
    preferences: int

    @classmethod
    def of(cls, user: User, preferences: int) -> UserSummary:
        return cls(**dict(user), preferences=preferences)


class UserList(Response):
    object: Literal["list"] = "list"
    data: list[UserSummary]


class KeyList(Response):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


class CreatedKey(KeyInfo):
    api_key: str  # shown this once: only its hash is stored


class RevokedKey(Response):
    id: str
    revoked: Literal[True] = True


class EventList(Response):
    object: Literal["list"] = "list"
    data: list[Event]
