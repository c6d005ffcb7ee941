"""`BackendConfig`: which LLM answers, and how hard the client may push it.

A pydantic model, so that the `backend:` section of a YAML config (`fspo synth`) and the options of a
judge are validated alike: a wrong type or a misspelt key (`extra="forbid"`) fails at once, naming
the field, not hours into a run.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from fspo.core.errors import UserError


class BackendConfig(BaseModel):
    """The backend (`kind: openai` for any OpenAI-compatible chat-completions endpoint: OpenAI, vLLM,
    llama.cpp's server, Ollama, TGI; `kind: transformers` for a Hugging Face causal LM in-process) and
    the client's policy for it: concurrency, rate limit, retries, re-asks and prices.
    """

    model_config = ConfigDict(extra="forbid")

    # When set, `<env_prefix>_MODEL` and `<env_prefix>_BASE_URL` fill `model` and `base_url` left unset.
    env_prefix: ClassVar[str | None] = None

    kind: Literal["openai", "transformers"] = "openai"
    model: str | None = Field(None, description="Model name (openai) or HF folder/id (transformers).")
    base_url: str | None = Field(None, description="Endpoint, e.g. http://localhost:8000/v1.")
    api_key: str | None = Field(None, description="Literal key; prefer api_key_env.")
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(512, gt=0)
    seed: int | None = None
    json_mode: bool = Field(
        False, description="Send response_format=json_object (if the server supports it)."
    )
    max_concurrency: int = Field(8, gt=0, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0)
    timeout: float = Field(60.0, gt=0, description="Seconds per request before it counts as timed out.")
    max_retries: int = Field(
        6, ge=0, description="Retries of one request on timeout/429/5xx/connection errors."
    )
    backoff_base: float = Field(1.0, ge=0, description="First backoff in seconds; doubles per retry.")
    backoff_max: float = Field(60.0, ge=0)
    max_reasks: int = Field(2, ge=0, description="Re-asks after a reply that does not parse.")
    price_prompt_per_mtok: float = Field(0.0, ge=0, description="Cost per million prompt tokens.")
    price_completion_per_mtok: float = Field(0.0, ge=0, description="Cost per million completion tokens.")
    # transformers only
    batch_size: int = Field(8, gt=0, description="transformers: prompts generated together.")
    device: str = "cpu"
    dtype: str = "float32"

    def _env(self, name: str) -> str | None:
        return os.environ.get(f"{self.env_prefix}_{name}") if self.env_prefix else None

    def resolved_model(self) -> str:
        model = self.model or self._env("MODEL")
        if not model:
            where = f" or in {self.env_prefix}_MODEL" if self.env_prefix else ""
            raise UserError(f"backend.model: not set (set it in the config{where})")
        return model

    def resolved_base_url(self) -> str | None:
        return self.base_url or self._env("BASE_URL") or os.environ.get("OPENAI_BASE_URL")

    def resolved_api_key(self) -> str:
        # Local servers (vLLM, llama.cpp, Ollama) accept any key; the client insists on one.
        return self.api_key or os.environ.get(self.api_key_env) or "EMPTY"

    def generation_params(self) -> dict[str, Any]:
        """The parameters that change an answer: part of every request's cache key."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Money for one response, at the prices per million tokens (as providers list them)."""
        return (
            prompt_tokens * self.price_prompt_per_mtok + completion_tokens * self.price_completion_per_mtok
        ) / 1e6
