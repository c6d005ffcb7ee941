"""Evaluation: preference accuracy vs shots, personalized generation, judges, win rates, the report.

The public API (what `fspo quickstart` and notebooks call), imported lazily so that `import fspo.eval`
stays cheap (no torch, no openai) until a function is used:

    generate_for_episodes(model, tokenizer, episodes, mode="plain"|"rat"|"oracle", ...) -> records
    accuracy_curve(model, tokenizer, episodes, shots=(0, 1, 2, 4, 8), ref_model=...) -> dict
    winrate(a_jsonl, b_jsonl, users, judge="exact"|"openai"|"local"|Judge, out=...) -> WinRateResult
    make_judge(name, **options) / ExactRewardJudge / OpenAIJudge / LocalJudge
    write_report(out_dir, winrates, accuracy, examples, disagreement, title, notes) -> paths
    collect_examples(...), preference_disagreement(...), report_from_run(run_dir)
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "generate_for_episodes": "fspo.eval.generate",
    "accuracy_curve": "fspo.eval.accuracy",
    "winrate": "fspo.eval.winrates",
    "WinRate": "fspo.eval.winrates",
    "WinRateResult": "fspo.eval.winrates",
    "load_winrates": "fspo.eval.winrates",
    "summarize": "fspo.eval.winrates",
    "make_judge": "fspo.eval.judges",
    "Judge": "fspo.eval.judges",
    "ExactRewardJudge": "fspo.eval.judges",
    "OpenAIJudge": "fspo.eval.judges",
    "LocalJudge": "fspo.eval.judges",
    "write_report": "fspo.eval.report",
    "collect_examples": "fspo.eval.report",
    "preference_disagreement": "fspo.eval.report",
    "report_from_run": "fspo.eval.run_report",
    "wilson_interval": "fspo.eval.stats",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fspo.eval' has no attribute {name!r}")
