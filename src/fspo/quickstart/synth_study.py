"""`fspo study init --from-synth`: a blind study whose content is a `fspo synth` export, for real people.

The bank people label is the synthesized answer pairs (answers written from different viewpoints of one
question, which the synthesized personas judged: pairs that differ in ways a person can see), one pair
per question and pair of answers, with the personas' verdicts dropped (the sides are drawn per
participant anyway). A seeded share of the questions is held out of the bank: they are the trials'
questions, so no participant compares answers to a question they labeled. The two systems are whatever
the operator serves under the study's names (`--fspo-model`, `--baseline-model`), printed as the
`fspo serve` command that runs the study.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError


def init_from_synth(
    synth: str | Path,
    out: str | Path,
    *,
    code: str | None = None,
    label_count: int = 8,
    trials: int = 5,
    seed: int = 0,
    heldout: float = 0.2,
    fspo_model: str | Path = "FSPO_MODEL",
    baseline: str = "base=BASELINE_MODEL:0",
    shots: int = 8,
) -> dict[str, Any]:
    """Write study.yaml, pairs.jsonl and questions.jsonl of a study on `synth`'s export into `out`; the
    study and the command that serves it. `baseline` is ``fspo serve --baseline``'s NAME=DIR[:SHOTS]."""
    import secrets

    import yaml

    from fspo.core.files import atomic_write_jsonl, atomic_write_text
    from fspo.data.io import find_data_file, read_records, write_records
    from fspo.data.schema import Preference
    from fspo.serve.cli import parse_baseline

    root, out = Path(synth), Path(out)
    if not 0 < heldout < 1:
        raise UserError(f"--heldout: a share between 0 and 1, not {heldout}")
    base = parse_baseline(baseline)
    prefs = read_records(find_data_file(root, "preferences"), Preference)
    questions = sorted({p.question for p in prefs})
    random.Random(seed).shuffle(questions)
    held = set(questions[: max(1, round(len(questions) * heldout))])
    bank = list(
        {(p.question, *sorted((p.chosen, p.rejected))): p for p in prefs if p.question not in held}.values()
    )
    if len(bank) < label_count:
        raise UserError(
            f"{root}: {len(bank)} answer pairs outside the held-out questions, "
            f"fewer than --label-count {label_count}"
        )
    if len(held) < trials:
        raise UserError(
            f"{root}: {len(held)} held-out questions, fewer than --trials {trials} (raise --heldout)"
        )
    study = {
        "code": code or secrets.token_urlsafe(6),
        "pairs": "pairs.jsonl",
        "label_count": label_count,
        "questions": "questions.jsonl",
        "trials_per_participant": trials,
        "fspo": "fspo",
        "baseline": base.name,
        "seed": seed,
    }
    write_records(out / "pairs.jsonl", bank)
    atomic_write_jsonl(out / "questions.jsonl", ({"question": q} for q in sorted(held)))
    header = (
        f"# A blind study of FSPO vs {base.name} on the synthesized questions and answers of {root}\n"
        "# (written by `fspo study init --from-synth`; paths are relative to this file's folder).\n"
    )
    atomic_write_text(out / "study.yaml", header + yaml.safe_dump(study, sort_keys=False))
    serve = (
        f"fspo serve --model {fspo_model} --shots {shots} --baseline {baseline} "
        f"--study {out / 'study.yaml'} --db sqlite:///{out / 'study.db'}"
    )
    return {"study": study, "pairs": len(bank), "questions": len(held), "serve": serve}
