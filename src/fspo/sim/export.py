"""Writing and reading a simulated population folder: users.jsonl, preferences.jsonl, sim_meta.json.

The two JSONL files follow the project's dataset-folder convention (`fspo.data.io`), so every
later stage reads them like any other data; sim_meta.json records how they were made (domain, seed,
options, stats) so the run can be reproduced from it alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fspo.core.files import atomic_write_json
from fspo.data.io import read_dataset_dir, write_dataset_dir
from fspo.data.schema import Preference, User
from fspo.sim.base import SimData
from fspo.sim.stats import stats

META = "sim_meta.json"
OUTPUTS = ("users.jsonl", "preferences.jsonl", META)  # what `write_sim` writes (and `--overwrite` removes)


def write_sim(out_dir: str | Path, data: SimData, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the population atomically (each file whole or not at all); return the metadata written."""
    out = Path(out_dir)
    write_dataset_dir(out, data.preferences, data.users)
    meta = {
        "domain": data.domain,
        "seed": data.seed,
        "options": data.options,
        "info": data.info,
        "stats": summary if summary is not None else stats(data),
    }
    atomic_write_json(out / META, meta)  # last: its presence means the folder is complete
    return meta


def read_sim(folder: str | Path) -> tuple[list[User], list[Preference]]:
    prefs, users, _ = read_dataset_dir(folder)
    return users, prefs
