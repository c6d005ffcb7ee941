"""Synthetic users and preferences made with an LLM, at the paper's scale, resumable.

`fspo synth run CONFIG.yaml` runs traits -> personas (iteratively refined) -> questions (de-duplicated)
-> view-conditioned answers -> labels (both orders, inconsistent verdicts dropped) -> export (the core
`User`/`Preference` records and a dataset card). `fspo synth stats DIR` reports diversity and label
agreement. From Python::

    from fspo.synth import load_config, run_pipeline
    run_pipeline(load_config("configs/synth/reviews.yaml"), out="runs/reviews")
"""

from fspo.synth.backends import Backend, Completion, TransientError, make_backend
from fspo.synth.cache import RequestCache, request_key
from fspo.synth.client import BackendUnavailable, ClientStats, LLMClient, ParseFailure
from fspo.synth.config import BackendConfig, SynthConfig, load_config
from fspo.synth.pipeline import Pipeline, run_pipeline
from fspo.synth.prompts import PromptTemplate, load_prompts
from fspo.synth.stats import synth_stats

__all__ = [
    "Backend",
    "BackendConfig",
    "BackendUnavailable",
    "ClientStats",
    "Completion",
    "LLMClient",
    "ParseFailure",
    "Pipeline",
    "PromptTemplate",
    "RequestCache",
    "SynthConfig",
    "TransientError",
    "load_config",
    "load_prompts",
    "make_backend",
    "request_key",
    "run_pipeline",
    "synth_stats",
]
