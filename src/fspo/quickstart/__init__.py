"""`fspo quickstart`: the whole FSPO pipeline on the embedded default model, in one command.

`profile` reads a run's sizes and budgets, `trainings` turns them into the training runs' configs,
`pipeline` runs the stages, `report` writes what they measured.
"""

from fspo.quickstart.pipeline import generated_systems, pretraining_texts, rat_stage, run_quickstart, stages
from fspo.quickstart.profile import Profile, default_out, domains, load_profile

__all__ = [
    "Profile",
    "default_out",
    "domains",
    "generated_systems",
    "load_profile",
    "pretraining_texts",
    "rat_stage",
    "run_quickstart",
    "stages",
]
