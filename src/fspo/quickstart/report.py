"""The quickstart's report: win rates of the registry's comparisons, what the answers carry, accuracy
against the Bayes ceiling, RAT's descriptions, and findings in words, all derived from the run's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fspo.core.stages import StageRunner
from fspo.eval.systems import System, comparisons, verdict_pairs
from fspo.quickstart.profile import Profile


def report(
    p: Profile, systems: tuple[System, ...], runner: StageRunner, folder: Path, test: list
) -> dict[str, Any]:
    """Judge every comparison of `systems`, write ``report.md`` / ``results.json`` into `folder` and
    return the summary (the quickstart's `report` stage)."""
    from fspo.data.io import read_dataset_dir
    from fspo.eval import collect_examples, write_report
    from fspo.eval.personal import (
        description_quality,
        loop_shares,
        shot_ceiling,
        trait_shares,
        winrate_ceiling,
    )
    from fspo.eval.readers import read_generations
    from fspo.sim import disagreement_matrix

    gen = runner.folder("generate")
    results = _winrates(systems, gen, runner.folder("sim") / "users.jsonl")
    prefs, users, _ = read_dataset_dir(runner.folder("sim"))
    generations = {s.name: [row for _, row in read_generations(gen / f"{s.name}.jsonl")] for s in systems}
    user_map = {u.user_id: u for u in users}
    accuracy = json.loads((runner.folder("accuracy") / "accuracy.json").read_text())
    shares = trait_shares(user_map, [r for recs in generations.values() for r in recs])
    by_split = {s: [e for e in test if e.split == s] for s in ("test_unseen", "test_seen")}
    ceiling = shot_ceiling(user_map, by_split, max_shots=p.shots)
    descriptions = {
        s.name: description_quality(user_map, generations[s.name]) for s in systems if s.mode == "rat"
    }
    loops = loop_shares(r for recs in generations.values() for r in recs)
    opponents = dict.fromkeys(o for _, o in comparisons(systems))
    ceilings = {o: winrate_ceiling(user_map, generations[o]) for o in opponents}
    curve = _best_of_curve(p, systems, generations, folder, user_map)
    notes = [
        f"Profile: {p.model_dump_json()}",
        "Win rates are judged by each simulated user's exact reward r_u(text); ties count as half.",
        f"Every system's answers are decoded alike: {p.generation_decoding().describe()}"
        + (
            f", best of {p.best_of} by each system's own implicit reward (RAT: one answer)"
            if p.best_of > 1
            else ""
        ),
        _unseen_note(p),
        *findings(results, descriptions, verdict_pairs(systems)),
    ]
    write_report(
        folder,
        results,
        accuracy,
        collect_examples(generations, test, user_map),
        disagreement_matrix(users, prefs),
        title=f"FSPO quickstart: simulated {p.domain} users",
        notes=notes,
        sections={
            "Trait values the answers carry": _shares_markdown(shares),
            "What the shots can tell: the Bayes ceiling": _ceiling_markdown(ceiling, accuracy),
            "RAT's inferred descriptions": _descriptions_markdown(descriptions),
            "Win rates against their ceilings": _ceilings_markdown(results, ceilings),
            "Degenerate answers": _loops_markdown(loops),
            **({"Best-of-N curve": _curve_markdown(curve)} if curve else {}),
        },
    )
    return {
        "winrates": _merged(results),
        "trait_shares": shares,
        "loops": loops,
        "ceilings": ceilings,
        **({"best_of_curve": curve} if curve else {}),
        "descriptions": descriptions,
        "ceiling": ceiling,
        "accuracy": {name: acc_at(curve, p.shots) for name, curve in accuracy.items()},
        "report": str(folder / "report.md"),
    }


def _winrates(systems: tuple[System, ...], gen: Path, users_file: Path) -> list:
    from fspo.eval import winrate

    results = []
    for system, opponent in comparisons(systems):
        res = winrate(
            gen / f"{system}.jsonl",
            gen / f"{opponent}.jsonl",
            users_file,
            "exact",
            system=system,
            opponent=opponent,
        )
        results.extend(res.results)
    return results


# The comparisons the best-of-N curve follows: FSPO against the baselines and its no-shot control.
CURVE_PAIRS = (("fspo", "population-ipo"), ("fspo", "few-shot-prompting"), ("fspo", "fspo-no-shots"))


def _best_of_curve(
    p: Profile,
    systems: tuple[System, ...],
    generations: dict[str, list[dict[str, Any]]],
    folder: Path,
    user_map: dict[str, Any],
) -> dict[str, Any]:
    """Win rates and trait values at each N of `p.best_of_curve`: every record re-chosen among its first
    N candidates (samples nest: best-of-N's are the first N of best-of-`p.best_of`'s), written to
    ``folder/best-of-<N>/`` and judged like the main table."""
    from fspo.core.files import atomic_write_jsonl
    from fspo.eval import winrate
    from fspo.eval.personal import trait_shares

    curve: dict[str, Any] = {}
    names = [s.name for s in systems if s.mode != "rat"]
    for n in p.best_of_curve:
        sub = folder / f"best-of-{n}"
        chosen = {name: [_first_n(r, n) for r in generations[name]] for name in names}
        for name, records in chosen.items():
            atomic_write_jsonl(sub / f"{name}.jsonl", records)  # the files the win rates judge
        rates = {}
        for a, b in CURVE_PAIRS:
            if a in names and b in names:
                res = winrate(sub / f"{a}.jsonl", sub / f"{b}.jsonl", user_map, "exact", system=a, opponent=b)
                rates[f"{a} vs {b}"] = {w.split: round(w.win_rate, 4) for w in res.results}
        shares = trait_shares(user_map, [r for records in chosen.values() for r in records])
        curve[str(n)] = {
            "winrates": rates,
            "trait_share_unseen": {
                s: v["test_unseen"]["trait_share"] for s, v in shares.items() if "test_unseen" in v
            },
        }
    return curve


def _first_n(record: dict[str, Any], n: int) -> dict[str, Any]:
    """`record` as best-of-`n` would have written it: the best of its first `n` candidates."""
    candidates = record.get("candidates")
    if not candidates:
        return record
    best = max(range(n), key=lambda j: candidates[j]["reward"])
    return {**record, "answer": candidates[best]["answer"], "best_index": best, "best_of": n,
            "candidates": candidates[:n]}  # fmt: skip


def _table(intro: list[str], header: list[str], rows: list[list[str]]) -> str:
    """`intro`'s lines, a blank line, then a Markdown table of `header` and `rows` (cells as shown)."""
    return "\n".join([*intro, "", *_table_lines(header, rows)])


def _table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), "|---" * len(header) + "|", *(_row(cells) for cells in rows)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _curve_markdown(curve: dict[str, Any]) -> str:
    pairs = list(dict.fromkeys(pair for point in curve.values() for pair in point["winrates"]))
    rows = [
        [str(n)]
        + [_pct(point["winrates"].get(pair, {}).get("unseen")) for pair in pairs]
        + [_pct(point["trait_share_unseen"].get("fspo"))]
        for n, point in curve.items()
    ]
    intro = [
        "Win rates on unseen users and the trait values FSPO's answers carry as N grows (each record",
        "re-chosen among its first N samples by its system's own implicit reward).",
    ]
    return _table(intro, ["N", *pairs, "FSPO: unseen trait share"], rows)


def _ceilings_markdown(results: list, ceilings: dict[str, dict[str, Any]]) -> str:
    intro = [
        "A win rate read against the most any system could win against that opponent: the exact judge's",
        "verdict of an ideal answer (every one of the user's trait values, fully relevant:",
        "`fspo.sim.base.Domain.ideal_reward`) against each of the opponent's answers",
        "(`fspo.eval.personal.winrate_ceiling`). An opponent whose answers already satisfy the users leaves",
        "little to win.",
    ]
    header = [
        "comparison",
        "unseen: win rate",
        "unseen: ceiling",
        "share of it",
        "seen: win rate",
        "seen: ceiling",
    ]
    rows = []
    cell = {(w.system, w.opponent, w.split): w.win_rate for w in results}
    pairs = list(dict.fromkeys((w.system, w.opponent) for w in results if w.opponent != "base"))
    for system, opponent in pairs:
        ceiling = ceilings.get(opponent, {})
        unseen, top = cell.get((system, opponent, "unseen")), ceiling.get("unseen", {}).get("win_rate")
        share = _pct(unseen / top) if unseen is not None and top else "-"
        seen, top_seen = cell.get((system, opponent, "seen")), ceiling.get("seen", {}).get("win_rate")
        rows.append([f"{system} vs {opponent}", _pct(unseen), _pct(top), share, _pct(seen), _pct(top_seen)])
    return _table(intro, header, rows)


def _loops_markdown(loops: dict[str, dict[str, dict[str, float]]]) -> str:
    intro = [
        "Share of each system's answers that are repetition loops (`fspo.eval.personal.repetition_loop`)."
    ]
    rows = [
        [system]
        + [
            f"{_pct(c['loop_share'])} ({c['loops']}/{c['n']})" if c else "-"
            for c in (per.get("test_unseen"), per.get("test_seen"))
        ]
        for system, per in loops.items()
    ]
    return _table(intro, ["system", "unseen", "seen"], rows)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def acc_at(curve: dict[str, Any], shots: int) -> dict[str, float]:
    """A curve's accuracy per split at the most shots up to `shots`."""
    out = {}
    for split, points in curve["splits"].items():
        best = [pt for pt in points if pt["shots"] <= shots]
        if best:
            out[split] = round(best[-1]["accuracy"], 4)
    return out


def _merged(results: list) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for w in results:
        merged.setdefault(f"{w.system} vs {w.opponent}", {})[w.split] = {
            "win_rate": round(w.win_rate, 4),
            "ci": [round(w.ci_low, 4), round(w.ci_high, 4)],
            "n": w.n,
        }
    return merged


def _shares_markdown(shares: dict[str, dict[str, dict[str, float]]]) -> str:
    intro = [
        "Per system, the mean share of each user's trait values its answers carry (`fspo.eval.personal`;",
        "a personalizing model carries nearly all, one answering for the population average carries what",
        "the average user's values share with each user's), and the relevance every user rewards alike.",
    ]
    header = ["system", "unseen: trait share", "unseen: relevance", "seen: trait share", "seen: relevance"]
    rows = []
    for system, per in shares.items():
        cells = [system]
        for split in ("test_unseen", "test_seen"):
            c = per.get(split)
            cells += [f"{100 * c['trait_share']:.1f}%", f"{c['relevance']:.3f}"] if c else ["-", "-"]
        rows.append(cells)
    return _table(intro, header, rows)


def _descriptions_markdown(quality: dict[str, dict[str, Any]]) -> str:
    intro = [
        "How often the description a RAT system writes names the user's true value of each trait",
        "(`fspo.eval.personal.description_quality`), and how often its answer carries the values its own",
        "description names.",
    ]
    header = [
        "system",
        "split",
        "true values named",
        "per trait",
        "extra traits per answer",
        "answer follows it",
    ]
    rows = []
    for system, per in quality.items():
        for split, q in per.items():
            traits = ", ".join(f"{t} {100 * c['accuracy']:.0f}%" for t, c in q["per_trait"].items())
            follows = "-" if q["follows"] is None else f"{100 * q['follows']:.0f}% of {q['stated']}"
            true_named = f"{100 * q['named']:.1f}% of {q['values']}"
            rows.append([system, split, true_named, traits, f"{q['extra_per_record']:.2f}", follows])
    lines = [_table(intro, header, rows)]
    main = quality.get("fspo-rat", {}).get("test_unseen")
    if main:
        lines += ["", "Confusion on unseen users (fspo-rat): true value → what the description named.", ""]
        for trait, table in main["confusion"].items():
            named = sorted({k for row in table.values() for k in row})
            counts = [[value] + [str(row.get(k, 0)) for k in named] for value, row in sorted(table.items())]
            lines += [*_table_lines([f"{trait}: true \\ named", *named], counts), ""]
    return "\n".join(lines)


def _ceiling_markdown(ceiling: dict[str, dict[str, dict[str, float]]], accuracy: dict[str, Any]) -> str:
    intro = [
        "Preference accuracy a Bayes learner reaches from n shots, holding the population's personas as",
        "hypotheses (`fspo.eval.personal.shot_ceiling`), beside FSPO's implicit-reward accuracy.",
    ]
    rows = []
    splits = accuracy.get("fspo", {}).get("splits", {})
    fspo = {split: {pt["shots"]: pt["accuracy"] for pt in points} for split, points in splits.items()}
    for split, curve in ceiling.items():
        for n, c in curve.items():
            mine = fspo.get(split, {}).get(int(n))
            share = f"{100 * mine / c['accuracy']:.0f}%" if mine is not None and c["accuracy"] else "-"
            shown = "-" if mine is None else f"{mine:.3f}"
            bound = f"{c['accuracy']:.3f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
            rows.append([split, str(n), bound, shown, share])
    return _table(intro, ["split", "shots", "ceiling", "FSPO accuracy", "share of the ceiling"], rows)


def _unseen_note(p: Profile) -> str:
    if p.sim_options.get("holdout") == "users":
        return "'unseen' users were held out of training at random; training users share their traits."
    return "'unseen' users hold trait combinations that no training user has."


def findings(
    results: list, descriptions: dict[str, Any] | None = None, pairs: list[tuple[str, str]] | None = None
) -> list[str]:
    """Plain-language verdicts on unseen users, derived from the tables (never hard-coded): one per
    (system, opponent) of `pairs` (the registry's verdicts by default), then RAT against its oracle."""
    cell = {(w.system, w.opponent): w for w in results if w.split == "unseen"}

    def verdict(system: str, opponent: str) -> str | None:
        w = cell.get((system, opponent))
        if w is None:
            return None
        word = "beats" if w.ci_low > 0.5 else "loses to" if w.ci_high < 0.5 else "is not distinguishable from"
        return f"{system} {word} {opponent} on unseen users ({100 * w.win_rate:.1f}%, n={w.n})"

    if pairs is None:
        from fspo.eval.systems import SYSTEMS

        pairs = verdict_pairs(SYSTEMS)
    found = [v for v in (verdict(*pair) for pair in pairs) if v]
    rat, oracle = cell.get(("fspo-rat", "population-ipo")), cell.get(("oracle", "population-ipo"))
    if rat and oracle and oracle.win_rate > 0:
        found.append(
            f"fspo-rat recovers {100 * rat.win_rate / oracle.win_rate:.0f}% of the oracle's win rate against "
            f"population-ipo on unseen users ({100 * rat.win_rate:.1f}% vs {100 * oracle.win_rate:.1f}%)"
        )
    quality = (descriptions or {}).get("fspo-rat", {}).get("test_unseen")
    if quality:
        follows = "-" if quality["follows"] is None else f"{100 * quality['follows']:.0f}%"
        found.append(
            f"fspo-rat's inferred descriptions name {100 * quality['named']:.0f}% of unseen users' true "
            f"trait values (n={quality['values']}); its answers carry {follows} of the values their "
            "own description names"
        )
    return found


def print_table(console: Console, summary: dict[str, Any], timings: dict[str, float]) -> None:
    table = Table(title="FSPO quickstart: win rate (exact-reward judge), 95% CI, n")
    table.add_column("system vs opponent")
    for split in ("unseen", "seen"):
        table.add_column(f"{split} users", justify="right")
    for row, cells in summary.get("winrates", {}).items():
        table.add_row(row, *(_fmt(cells.get(split)) for split in ("unseen", "seen")))
    console.print(table)
    total = sum(timings.values())
    console.print(f"Report: {summary.get('report')}   (this run: {total / 60:.1f} min)")


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    lo, hi = cell["ci"]
    return f"{100 * cell['win_rate']:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}] n={cell['n']}"
