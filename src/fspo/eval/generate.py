"""Personalized generation of a test set: answer each episode's query for its user, from that user's shots.

Prompts and decoding are `fspo.infer.generate`'s (the same path serving uses). Outputs are JSONL,
one record per episode, written atomically at the end; finished batches go to an append log beside
the output first, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fspo.core.errors import DataError, UserError
from fspo.core.files import AppendLog, atomic_write_jsonl, json_lines
from fspo.data.schema import Episode, User
from fspo.data.template import TemplateOptions, parse_generation
from fspo.infer.generate import Mode, answer_finished, batch_seed, generate_batch, prompt_ids

# Everything that decides a record's text. `batch_size` is among them: it decides which episodes
# share a batch, hence the padding and, when sampling, `batch_seed`.
SETTINGS = ("system", "mode", "shots", "max_new_tokens", "temperature", "top_p", "seed", "batch_size")


def _record(
    episode: Episode, new_ids: list[int], n_prompt: int, tokenizer: Any, settings: dict[str, Any]
) -> dict:
    raw = tokenizer.decode(new_ids, skip_special_tokens=True)
    parsed = parse_generation(raw)
    rat = settings["mode"] == Mode.RAT
    hit_eos = tokenizer.eos_token_id in new_ids
    return {
        "episode_id": episode.episode_id,
        "user_id": episode.user_id,
        "split": episode.split,
        "question": episode.query.question,
        **settings,
        "num_shots": episode.num_shots
        if settings["shots"] is None
        else min(settings["shots"], episode.num_shots),
        "answer": parsed.answer,
        "description": parsed.description,
        "raw": raw,
        "prompt_tokens": n_prompt,
        "new_tokens": len(new_ids),
        "truncated": not hit_eos
        and not answer_finished(raw, rat)
        and len(new_ids) >= settings["max_new_tokens"],
    }


def _read_log(path: Path) -> Iterator[tuple[str, dict]]:
    """('file:line', record) for each whole line of an append log, after cutting a torn last line.

    A kill can stop `AppendLog.append` mid-line; opening the log drops that line, so its episode
    is generated again. Any other bad line was not written by us and is a `DataError` naming it.
    """
    AppendLog(path).close()  # the repair happens on open
    for where, row in json_lines(path, "pass --overwrite to start over"):
        if not isinstance(row, dict):
            raise DataError(f"{where}: record: expected a JSON object")
        yield where, row


def _resume(out: Path, settings: dict[str, Any]) -> dict[str, dict]:
    """Records already generated with the same settings: the final output's, then the partial log's."""
    from fspo.eval.records import read_rows

    done: dict[str, dict] = {}
    sources = []
    if out.exists():
        sources.append(read_rows(out))
    if partial_path(out).exists():
        sources.append(_read_log(partial_path(out)))
    for rows in sources:
        for where, rec in rows:
            theirs = {k: rec.get(k) for k in SETTINGS}
            if theirs != settings:
                raise UserError(
                    f"{where}: generated with other settings {theirs} (now {settings}); "
                    "pass --overwrite to start over, or write to another --out"
                )
            if not isinstance(rec.get("episode_id"), str):
                raise DataError(f"{where}: episode_id: missing or not a string")
            done[rec["episode_id"]] = rec
    return done


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def generate_for_episodes(
    model: Any,
    tokenizer: Any,
    episodes: Sequence[Episode],
    *,
    mode: Mode | str = Mode.PLAIN,
    shots: int | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    options: TemplateOptions | None = None,
    users: dict[str, User] | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Generate one answer per episode; returns the records (and writes them to `out` if given).

    `shots` keeps each episode's first k shots (None: all). `system` names the system in reports
    (default: the mode). `users` supplies descriptions for oracle mode when episodes lack them.
    With `out`, episodes already in `out` or in its ``.partial`` append log (a killed run's finished
    records) are kept, not generated again; the settings must match theirs (`UserError` otherwise).
    """
    mode = Mode(mode)
    if len({e.episode_id for e in episodes}) != len(episodes):
        raise DataError("duplicate episode_id among the episodes to generate for")
    settings = {
        "system": system or mode.value,
        "mode": mode.value,
        "shots": shots,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "batch_size": batch_size,
    }
    out_path = Path(out) if out is not None else None
    done = _resume(out_path, settings) if out_path is not None else {}
    # The batches are planned over *all* episodes, done or not (longest prompts first: less
    # padding), so a resumed run decodes every batch it still needs exactly as an uninterrupted run
    # would: same rows, same padding, same `batch_seed`. A batch is skipped only when every episode
    # in it is done; a batch a kill cut part-way is decoded again whole and only its missing
    # records are taken, so the output is byte-identical to a run that never stopped.
    encoded = []
    for e in episodes:
        desc = e.description or (users[e.user_id].description if users and e.user_id in users else None)
        encoded.append((e, prompt_ids(e, tokenizer, mode, shots, options, desc)))
    encoded.sort(key=lambda item: -len(item[1]))  # stable: ties keep the input order
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    todo = [chunk for chunk in batches if any(e.episode_id not in done for e, _ in chunk)]

    log = AppendLog(partial_path(out_path)) if out_path is not None and todo else None
    try:
        if progress:
            from tqdm import tqdm

            todo = tqdm(todo, desc=f"generate {settings['system']}", unit="batch")
        for chunk in todo:
            new = generate_batch(
                model,
                tokenizer,
                [ids for _, ids in chunk],
                rat=mode is Mode.RAT,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=batch_seed(seed, [e.episode_id for e, _ in chunk]),
            )
            for (episode, ids), new_ids in zip(chunk, new, strict=True):
                if episode.episode_id in done:  # kept as first written
                    continue
                rec = _record(episode, new_ids, len(ids), tokenizer, settings)
                done[episode.episode_id] = rec
                if log is not None:
                    log.append(rec)
    finally:
        if log is not None:
            log.close()
    records = [done[e.episode_id] for e in episodes]
    if out_path is not None:
        atomic_write_jsonl(out_path, records)
        partial_path(out_path).unlink(missing_ok=True)
    return records
