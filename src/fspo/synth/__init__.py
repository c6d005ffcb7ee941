"""Synthetic users and preferences made with an LLM, at the paper's scale, resumable.

`fspo synth run CONFIG.yaml` runs traits -> personas (iteratively refined) -> questions (de-duplicated)
-> view-conditioned answers -> labels (both orders, inconsistent verdicts dropped) -> export (the core
`User`/`Preference` records and a dataset card). `fspo synth stats DIR` reports diversity and label
agreement. Every LLM request goes through `fspo.llm.LLMClient`. From Python::

    from fspo.synth import load_config, run_pipeline
    run_pipeline(load_config("configs/synth/reviews.yaml"), out="runs/reviews")
"""

from fspo.synth.config import SynthBackendConfig, SynthConfig, load_config
from fspo.synth.pipeline import Pipeline, run_pipeline
from fspo.synth.prompts import PromptTemplate, ask_prompt, load_prompts
from fspo.synth.stats import synth_stats

__all__ = [
    "Pipeline",
    "PromptTemplate",
    "SynthBackendConfig",
    "SynthConfig",
    "ask_prompt",
    "load_config",
    "load_prompts",
    "run_pipeline",
    "synth_stats",
]
