"""Any OpenAI-compatible chat-completions endpoint, through the official `openai` client.

Why the client's own retries are off (`max_retries=0`): `fspo.llm.LLMClient` retries every backend
the same way, counts each retry by cause, honours `Retry-After`, and pauses *all* requests after a
429 (the client's retries are per request and invisible). This module only maps the client's exceptions onto
`TransientError` (retry) or `UserError` (fix your config: bad key, unknown model, bad URL).
"""

from __future__ import annotations

from typing import Any

import openai

from fspo.core.errors import UserError
from fspo.llm.backends import Completion, Messages, TransientError
from fspo.llm.config import BackendConfig


def _retry_after(err: openai.APIStatusError) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms` (OpenAI's, finer) or `retry-after`."""
    headers = err.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return float(headers[name]) / scale
        except (KeyError, ValueError):
            continue
    return None


class OpenAIBackend:
    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.model = cfg.resolved_model()
        base_url = cfg.resolved_base_url()
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=cfg.resolved_api_key(), max_retries=0, timeout=cfg.timeout
        )
        self.where = base_url or "the OpenAI API"

    async def complete(self, messages: Messages, params: dict[str, Any]) -> Completion:
        extra: dict[str, Any] = {}
        if params.get("seed") is not None:
            extra["seed"] = params["seed"]
        if self.cfg.json_mode:
            extra["response_format"] = {"type": "json_object"}
        try:
            resp = await self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=params["temperature"],
                max_tokens=params["max_tokens"],
                **extra,
            )
        except openai.APITimeoutError as err:
            raise TransientError("timeout", str(err)) from err
        except openai.APIConnectionError as err:
            raise TransientError("connection", str(err)) from err
        except openai.RateLimitError as err:
            raise TransientError("rate_limit", str(err), _retry_after(err)) from err
        except openai.APIStatusError as err:
            if err.status_code >= 500 or err.status_code in (408, 409):
                raise TransientError("server", f"HTTP {err.status_code}", _retry_after(err)) from err
            raise UserError(
                f"backend: {self.where} refused the request (HTTP {err.status_code}): {err.message} "
                "- check backend.model, backend.base_url and the API key"
            ) from err
        if not resp.choices:
            return Completion("", 0, 0)
        usage = resp.usage
        return Completion(
            text=resp.choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    async def aclose(self) -> None:
        await self._client.close()
