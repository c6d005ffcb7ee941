"""The evaluation report: Markdown and HTML side by side, two figures, and results.json.

`write_report` is the one entry point (the CLI's `fspo report RUN_DIR` and the quickstart both call
it). It takes numbers already computed - `WinRate`s, accuracy curves, example generations, a
disagreement matrix - and only lays them out, so a report can be rebuilt from saved results without
a model. results.json holds every number of every table (and of the accuracy curve) in
machine-readable form, so nobody has to scrape the Markdown.

Figures use matplotlib's object API (`Figure`, Agg canvas): no pyplot global state, safe headless.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fspo.core.files import atomic_open, atomic_write_json, atomic_write_text
from fspo.data.schema import Episode, Preference, User
from fspo.eval.systems import labels as system_labels
from fspo.eval.winrates import WinRate

# The systems of the paper, in the order its tables list them, with display names.
SPLIT_ORDER = ("seen", "unseen", "all")


def system_label(name: str) -> str:
    return system_labels().get(name, name)  # the registry's display names (`fspo.eval.systems`)


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = set(values)
    known = [v for v in preferred if v in values]
    return known + sorted(values - set(known))


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _short(text: str | None, limit: int = 300) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# ------------------------------------------------------------------------------------------ tables
def winrate_tables(winrates: Sequence[WinRate]) -> list[dict[str, Any]]:
    """One table per (opponent, judge): rows are systems, columns splits, cells WinRates."""
    tables = []
    order = list(system_labels())
    keys = sorted({(w.opponent, w.judge) for w in winrates}, key=lambda k: (_order([k[0]], order), k))
    for opponent, judge in keys:
        cells = [w for w in winrates if w.opponent == opponent and w.judge == judge]
        rows = _order({w.system for w in cells}, list(system_labels()))
        cols = _order({w.split for w in cells}, SPLIT_ORDER)
        grid = {(w.system, w.split): w for w in cells}
        tables.append({"opponent": opponent, "judge": judge, "rows": rows, "cols": cols, "grid": grid})
    return tables


def _cell(w: WinRate | None) -> str:
    if w is None:
        return "–"
    return f"{_pct(w.win_rate)} [{_pct(w.ci_low)}, {_pct(w.ci_high)}] n={w.n}"


def _markdown_table(table: dict[str, Any]) -> str:
    head = "| System | " + " | ".join(table["cols"]) + " |"
    sep = "|---|" + "---|" * len(table["cols"])
    lines = [head, sep]
    for row in table["rows"]:
        cells = [_cell(table["grid"].get((row, col))) for col in table["cols"]]
        lines.append(f"| {system_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(table: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table["cols"])
    body = []
    for row in table["rows"]:
        cells = "".join(f"<td>{html.escape(_cell(table['grid'].get((row, c))))}</td>" for c in table["cols"])
        body.append(f"<tr><th>{html.escape(system_label(row))}</th>{cells}</tr>")
    return f"<table><tr><th>System</th>{head}</tr>{''.join(body)}</table>"


# ----------------------------------------------------------------------------------------- figures
def _accuracy_runs(accuracy: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """Accept one `accuracy_curve` result or a mapping label -> result."""
    if not accuracy:
        return {}
    if "splits" in accuracy:
        return {str(accuracy.get("model") or "model"): accuracy}
    return dict(accuracy)


def plot_accuracy(accuracy: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy vs number of shots, one line per (model, split), shaded confidence band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for label, run in _accuracy_runs(accuracy).items():
        for split, points in run["splits"].items():
            pts = [p for p in points if p["n"] > 0]
            if not pts:
                continue
            x = [p["shots"] for p in pts]
            (line,) = ax.plot(x, [p["accuracy"] for p in pts], marker="o", label=f"{label} – {split}")
            ax.fill_between(
                x, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], alpha=0.2, color=line.get_color()
            )
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("number of shots (the user's examples in the prompt)")
    ax.set_ylabel("preference accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_disagreement(matrix: np.ndarray, path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Heat map of how often two users disagree on the same comparison (NaN: nothing shared)."""
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(image, ax=ax, label="fraction of shared comparisons decided differently")
    if labels is not None and len(labels) <= 30:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_title("User disagreement")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def preference_disagreement(
    preferences: Iterable[Preference], user_ids: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """D[i, j] = fraction of the comparisons both users labeled on which they chose differently.

    A comparison is (question, unordered pair of answers). Users with nothing in common get NaN.
    It needs only the preferences, so it serves any dataset; `fspo.sim.disagreement_matrix` groups
    simulated users by persona instead.
    Why it matters: personalization only has something to learn where users disagree; a population
    that agrees everywhere is served by one model.
    """
    labels: dict[str, dict[tuple[str, frozenset[str]], str]] = {}
    for p in preferences:
        labels.setdefault(p.user_id, {})[(p.question.strip(), frozenset((p.chosen, p.rejected)))] = p.chosen
    ids = list(user_ids) if user_ids is not None else sorted(labels)
    m = np.full((len(ids), len(ids)), np.nan)
    for i, u in enumerate(ids):
        for j, v in enumerate(ids):
            lu, lv = labels.get(u, {}), labels.get(v, {})
            shared = lu.keys() & lv.keys()
            if shared:
                m[i, j] = sum(lu[k] != lv[k] for k in shared) / len(shared)
    return m, ids


# ---------------------------------------------------------------------------------------- examples
def collect_examples(
    generations: Mapping[str, Sequence[Mapping[str, Any]]],
    episodes: Sequence[Episode] | None = None,
    users: Mapping[str, User] | None = None,
    max_users: int = 3,
    max_shots: int = 3,
) -> list[dict[str, Any]]:
    """A few users' examples: their shots, and each system's answer (and RAT description).

    `generations` maps system -> generation records (from `generate_for_episodes`). One episode per
    user, the first that every system answered, users taken in order of appearance.
    """
    by_system = {s: {r["episode_id"]: r for r in recs} for s, recs in generations.items()}
    episode_by_id = {e.episode_id: e for e in episodes or ()}
    common = None
    for recs in by_system.values():
        common = set(recs) if common is None else common & set(recs)
    first = next(iter(by_system.values()), {})
    examples, seen_users = [], set()
    for eid, rec in first.items():
        if eid not in (common or set()) or rec["user_id"] in seen_users:
            continue
        seen_users.add(rec["user_id"])
        ep = episode_by_id.get(eid)
        user = (users or {}).get(rec["user_id"])
        examples.append(
            {
                "episode_id": eid,
                "user_id": rec["user_id"],
                "split": rec.get("split"),
                "description": (user.description if user else None) or (ep.description if ep else None),
                "shots": [
                    {
                        "question": _short(s.question, 160),
                        "chosen": _short(s.chosen, 160),
                        "rejected": _short(s.rejected, 160),
                    }
                    for s in (ep.shots[:max_shots] if ep else [])
                ],
                "num_shots": ep.num_shots if ep else rec.get("num_shots"),
                "question": rec["question"],
                "answers": {
                    s: {"answer": recs[eid]["answer"], "description": recs[eid].get("description")}
                    for s, recs in by_system.items()
                },
            }
        )
        if len(examples) >= max_users:
            break
    return examples


def _examples_markdown(examples: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for ex in examples:
        out.append(f"### User `{ex['user_id']}` ({ex.get('split') or 'split unknown'})\n")
        if ex.get("description"):
            out.append(f"**True description:** {_short(ex['description'], 500)}\n")
        if ex.get("shots"):
            out.append(f"**Shots** ({ex.get('num_shots')} in the prompt; first {len(ex['shots'])} shown):\n")
            for s in ex["shots"]:
                out.append(f"- *{s['question']}* — preferred: {s['chosen']} / dispreferred: {s['rejected']}")
            out.append("")
        out.append(f"**Question:** {ex['question']}\n")
        for system, ans in ex["answers"].items():
            out.append(f"**{system_label(system)}:** {_short(ans['answer'], 800) or '(empty)'}\n")
            if ans.get("description"):
                out.append(f"> *RAT description:* {_short(ans['description'], 500)}\n")
    return "\n".join(out)


def _examples_html(examples: Sequence[Mapping[str, Any]]) -> str:
    e = html.escape
    out = []
    for ex in examples:
        out.append(f"<h3>User <code>{e(ex['user_id'])}</code> ({e(ex.get('split') or 'split unknown')})</h3>")
        if ex.get("description"):
            out.append(f"<p><b>True description:</b> {e(_short(ex['description'], 500))}</p>")
        if ex.get("shots"):
            items = "".join(
                f"<li><i>{e(s['question'])}</i> — preferred: {e(s['chosen'])} / "
                f"dispreferred: {e(s['rejected'])}</li>"
                for s in ex["shots"]
            )
            out.append(
                f"<details><summary>Shots ({ex.get('num_shots')} in the prompt)</summary><ul>{items}</ul>"
                "</details>"
            )
        out.append(f"<p><b>Question:</b> {e(ex['question'])}</p><dl>")
        for system, ans in ex["answers"].items():
            out.append(f"<dt>{e(system_label(system))}</dt><dd><pre>{e(_short(ans['answer'], 800))}</pre>")
            if ans.get("description"):
                out.append(f"<p class=rat><i>RAT description:</i> {e(_short(ans['description'], 500))}</p>")
            out.append("</dd>")
        out.append("</dl>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ report
def _accuracy_markdown(accuracy: Mapping[str, Any]) -> str:
    lines = []
    for label, run in _accuracy_runs(accuracy).items():
        lines.append(f"*{label}* — scoring: {run.get('scoring')} ({run.get('note', '')})\n")
        lines.append(
            "| Split | "
            + " | ".join(f"{p['shots']} shots" for p in next(iter(run["splits"].values())))
            + " |"
        )
        lines.append("|---|" + "---|" * len(next(iter(run["splits"].values()))))
        for split, points in run["splits"].items():
            cells = [
                f"{_pct(p['accuracy'])} [{_pct(p['ci_low'])}, {_pct(p['ci_high'])}] n={p['n']}"
                for p in points
            ]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px}img{max-width:100%}.rat{color:#555}"""


# What `write_report` writes in its folder (`fspo report --overwrite` removes these, nothing else).
OUTPUTS = ("report.md", "report.html", "results.json", "accuracy.png", "disagreement.png")


def write_report(
    out_dir: str | Path,
    winrates: Sequence[WinRate] = (),
    accuracy: Mapping[str, Any] | None = None,
    examples: Sequence[Mapping[str, Any]] = (),
    disagreement: Any = None,
    title: str = "FSPO evaluation",
    notes: Sequence[str] = (),
    sections: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html, results.json and the figures into `out_dir`; return their paths.

    `sections`: more sections, title -> Markdown text, after the win rates (in the HTML as text).

    `accuracy`: one `accuracy_curve` result or a mapping label -> result. `disagreement`: a matrix,
    (matrix, user ids) as returned by `preference_disagreement`, or a `fspo.sim.Disagreement`.
    Tables show percent (estimate [CI low, CI high] n=pairs); results.json keeps fractions.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, matrix, labels = _figures(out, accuracy, disagreement)
    md, h = _document(title, notes)
    _winrate_section(md, h, winrate_tables(winrates))
    for heading, body in (sections or {}).items():
        md += [f"## {heading}\n", body.rstrip() + "\n"]
        h.append(f"<h2>{html.escape(heading)}</h2><pre>{html.escape(body)}</pre>")
    _figure_sections(md, h, paths, accuracy)
    if examples:
        md += ["## Example generations\n", _examples_markdown(examples)]
        h += ["<h2>Example generations</h2>", _examples_html(examples)]
    h.append("</body></html>")

    paths["markdown"] = out / "report.md"
    paths["html"] = out / "report.html"
    paths["results"] = out / "results.json"
    atomic_write_text(paths["markdown"], "\n".join(md) + "\n")
    atomic_write_text(paths["html"], "\n".join(h) + "\n")
    atomic_write_json(
        paths["results"],
        {
            "kind": "fspo.results",
            "title": title,
            "notes": list(notes),
            "winrates": [w.model_dump() for w in winrates],
            "accuracy": _accuracy_runs(accuracy) or None,
            "disagreement": None if matrix is None else _matrix_json(matrix, labels),
            "examples": list(examples),
            "files": {k: p.name for k, p in paths.items()},
        },
    )
    return paths


def _figures(
    out: Path, accuracy: Mapping[str, Any] | None, disagreement: Any
) -> tuple[dict[str, Path], Any, Any]:
    """The plots (accuracy vs shots, the disagreement matrix) and the matrix with its labels."""
    paths: dict[str, Path] = {}
    if _accuracy_runs(accuracy):
        paths["accuracy_png"] = plot_accuracy(accuracy, out / "accuracy.png")
    matrix = labels = None
    if disagreement is not None:
        if hasattr(disagreement, "matrix"):  # fspo.sim.Disagreement (users grouped by persona)
            matrix, labels = disagreement.matrix, disagreement.labels
        elif isinstance(disagreement, tuple):
            matrix, labels = disagreement
        else:
            matrix, labels = disagreement, None
        paths["disagreement_png"] = plot_disagreement(matrix, out / "disagreement.png", labels)
    return paths, matrix, labels


def _document(title: str, notes: Sequence[str]) -> tuple[list[str], list[str]]:
    """The Markdown and HTML heads: the title and one quoted note each."""
    md = [f"# {title}\n"]
    h = [
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for note in notes:
        md.append(f"> {note}\n")
        h.append(f"<blockquote>{html.escape(note)}</blockquote>")
    return md, h


def _winrate_section(md: list[str], h: list[str], tables: list[dict[str, Any]]) -> None:
    md.append("## Win rates\n")
    h.append("<h2>Win rates</h2>")
    if not tables:
        md.append("No win rates were computed.\n")
        h.append("<p>No win rates were computed.</p>")
    for t in tables:
        caption = (
            f"Win rate (%) against **{system_label(t['opponent'])}**, judge `{t['judge']}`: "
            "estimate [95% CI] n=pairs; ties count half."
        )
        md += [caption + "\n", _markdown_table(t), ""]
        h.append(
            f"<p>Win rate (%) against <b>{html.escape(system_label(t['opponent']))}</b>, judge "
            f"<code>{html.escape(t['judge'])}</code>: estimate [95% CI] n=pairs; ties count half.</p>"
        )
        h.append(_html_table(t))


def _figure_sections(md: list[str], h: list[str], paths: dict[str, Path], accuracy: Any) -> None:
    if "accuracy_png" in paths:
        md += [
            "## Preference accuracy vs number of shots\n",
            "![accuracy vs shots](accuracy.png)\n",
            _accuracy_markdown(accuracy),
        ]
        h.append(
            "<h2>Preference accuracy vs number of shots</h2><img src='accuracy.png' alt='accuracy vs shots'>"
        )
    if "disagreement_png" in paths:
        md += ["## User disagreement\n", "![disagreement matrix](disagreement.png)\n"]
        h.append("<h2>User disagreement</h2><img src='disagreement.png' alt='disagreement matrix'>")


def _matrix_json(matrix: Any, labels: Any) -> dict[str, Any]:
    return {
        "users": list(labels) if labels is not None else None,
        "matrix": [[None if math.isnan(x) else float(x) for x in row] for row in np.asarray(matrix, float)],
    }
