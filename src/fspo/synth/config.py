"""The `fspo synth run` configuration: pydantic models loaded from one YAML file.

Why pydantic: a typo or a wrong type in an overnight job's config must fail in the first second,
naming the file and the field (`backend.max_concurrency: Input should be greater than 0`), not after
three hours. `extra="forbid"` everywhere turns a misspelt key into such an error too.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fspo.core.errors import UserError
from fspo.llm.config import BackendConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthBackendConfig(BackendConfig):
    """The `backend:` section: `fspo.llm.BackendConfig`, whose model and endpoint may also come from
    the environment (FSPO_SYNTH_MODEL, FSPO_SYNTH_BASE_URL), so one config serves several endpoints."""

    env_prefix: ClassVar[str | None] = "FSPO_SYNTH"


class TraitDimension(_Strict):
    name: str = Field(min_length=1)
    values: list[str] = Field(min_length=2)


class TraitsConfig(_Strict):
    """Trait dimensions personas are sampled from: given here, or proposed by the LLM."""

    given: list[TraitDimension] = Field(default_factory=list)
    propose: int = Field(0, ge=0, description="How many more dimensions to ask the LLM for.")
    values_per_dimension: int = Field(4, ge=2)

    @model_validator(mode="after")
    def _some(self) -> TraitsConfig:
        if not self.given and self.propose == 0:
            raise ValueError("give trait dimensions in `given` or ask for some with `propose`")
        return self


class PersonasConfig(_Strict):
    count: int = Field(10, gt=0)
    traits_per_persona: int | None = Field(
        None, gt=0, description="Dimensions sampled per persona (all if unset)."
    )
    max_refine_rounds: int = Field(3, ge=0, description="Times a persona may be extended until specific.")


class DomainConfig(_Strict):
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    questions: list[str] = Field(default_factory=list, description="Given questions.")
    generate: int = Field(0, ge=0, description="How many questions to ask the LLM for.")
    per_request: int = Field(10, gt=0)


class QuestionsConfig(_Strict):
    domains: list[DomainConfig] = Field(min_length=1)


class AnswersConfig(_Strict):
    views_per_question: int = Field(4, ge=2, description="Viewpoints, hence answers, per question.")


class LabelsConfig(_Strict):
    per_user: int = Field(20, gt=0, description="Pairs each persona labels (each asked in both orders).")
    pair_pool: int | None = Field(
        None, gt=0, description="Draw every user's pairs from the first N pairs, so users overlap."
    )


class SynthConfig(_Strict):
    """One dataset: where it goes, who writes it, and how big each stage is."""

    name: str = Field(min_length=1)
    out: str = Field("runs/synth", description="Output folder (relative to the working directory).")
    seed: int = 0
    domain: str = Field(min_length=1, description="What the users judge, in a few words (prompts use it).")
    backend: SynthBackendConfig
    traits: TraitsConfig
    personas: PersonasConfig = Field(default_factory=PersonasConfig)
    questions: QuestionsConfig
    answers: AnswersConfig = Field(default_factory=AnswersConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    prompts_dir: str | None = Field(None, description="Folder of template files overriding the shipped ones.")


def load_config(path: str | Path) -> SynthConfig:
    """Read and validate a YAML config; every problem is a `UserError` naming file and field."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of fields")
    try:
        return SynthConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            problems.append(f"{where}: {e['msg']}")
        raise UserError(f"{path}: invalid config\n  " + "\n  ".join(problems)) from err
