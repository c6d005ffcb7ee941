"""LLM backends behind one small interface: `await backend.complete(messages, params) -> Completion`.

A backend only talks to its model. Concurrency limits, rate limits, retries, caching and parsing
live once, in `fspo.llm.client.LLMClient`, so every backend gets them alike. A backend signals a
failure worth retrying (timeout, 429, 5xx, dropped connection) by raising `TransientError`; anything
else it raises is fatal for the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fspo.llm.config import BackendConfig

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TransientError(Exception):
    """A failure that may go away if asked again: `kind` is timeout, rate_limit, server or connection."""

    def __init__(self, kind: str, message: str = "", retry_after: float | None = None):
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.retry_after = retry_after


class Backend(Protocol):
    model: str

    async def complete(self, messages: Messages, params: dict[str, Any]) -> Completion: ...

    async def aclose(self) -> None: ...


def make_backend(cfg: BackendConfig) -> Backend:
    """The backend the config asks for (imports lazily: torch only when `kind: transformers`)."""
    if cfg.kind == "openai":
        from fspo.llm.backends.openai_http import OpenAIBackend

        return OpenAIBackend(cfg)
    from fspo.llm.backends.hf_local import TransformersBackend

    return TransformersBackend(cfg)
