"""Prompt templates: versioned YAML files, not strings in code.

Each file under `fspo/synth/prompts/` has a `name`, a `version`, a `system` and a `user` text with
`$variables` (`string.Template`: JSON braces in a prompt need no escaping). The version goes into the
dataset card, and the rendered text into every request's cache key, so editing a prompt re-asks
exactly the requests it changes. A `prompts_dir` in the config overrides shipped files by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fspo.core.errors import UserError
from fspo.llm import LLMClient, ParseError, parse_reply

M = TypeVar("M", bound=BaseModel)

NAMES = (
    "traits_propose",
    "persona_seed",
    "persona_check",
    "persona_extend",
    "questions",
    "viewpoints",
    "answer",
    "judge",
    "reask",
)


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    system: str = ""
    user: str = Field(min_length=1)
    source: str = ""

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Chat messages for these variables; a missing variable is a bug, so it raises."""
        values = {k: str(v) for k, v in variables.items()}
        messages = []
        if self.system.strip():
            messages.append({"role": "system", "content": Template(self.system).substitute(values).strip()})
        messages.append({"role": "user", "content": Template(self.user).substitute(values).strip()})
        return messages

    def digest(self) -> str:
        return hashlib.sha256(f"{self.system}\x00{self.user}".encode()).hexdigest()[:12]


def _parse(text: str, where: str) -> PromptTemplate:
    try:
        raw = yaml.safe_load(text)
        return PromptTemplate.model_validate({**(raw or {}), "source": where})
    except (yaml.YAMLError, ValidationError) as err:
        raise UserError(f"{where}: invalid prompt template: {err}") from err


def load_prompts(override_dir: str | Path | None = None) -> dict[str, PromptTemplate]:
    """The shipped templates, with any same-named file in `override_dir` taking their place."""
    shipped = resources.files("fspo.synth") / "prompts"
    prompts = {n: _parse((shipped / f"{n}.yaml").read_text(encoding="utf-8"), f"{n}.yaml") for n in NAMES}
    if override_dir is not None:
        folder = Path(override_dir)
        if not folder.is_dir():
            raise UserError(f"prompts_dir: {folder} is not a folder")
        for path in sorted(folder.glob("*.yaml")):
            tpl = _parse(path.read_text(encoding="utf-8"), str(path))
            if tpl.name not in NAMES:
                raise UserError(f"{path}: name: unknown prompt {tpl.name!r} (known: {', '.join(NAMES)})")
            prompts[tpl.name] = tpl
    return prompts


async def ask_prompt(
    client: LLMClient,
    prompts: dict[str, PromptTemplate],
    name: str,
    schema: type[M],
    *,
    sample: str = "",
    check: Callable[[M], str | None] | None = None,
    **variables: Any,
) -> M:
    """Render template `name`, ask, parse the reply into `schema`; re-ask with the `reask` template.

    `check` may reject a reply that parses but is unusable (e.g. too few viewpoints) by returning
    the reason, which is sent back to the model like a parse error. Raises `fspo.llm.ParseFailure`.
    """

    def parse(text: str) -> M:
        reply = parse_reply(text, schema)
        problem = check(reply) if check else None
        if problem is not None:
            raise ParseError(problem)
        return reply

    return await client.ask(
        name,
        prompts[name].render(**variables),
        parse,
        lambda error: prompts["reask"].render(error=error),
        sample=sample,
    )
