"""Personalized generation of a test set: answer each episode's query for its user, from that user's shots.

Prompts and decoding are `fspo.infer.generate`'s (the same path serving uses). Outputs are JSONL,
one record per episode, written atomically at the end; finished batches go to an append log beside
the output first, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fspo.core.errors import DataError, UserError
from fspo.core.files import AppendLog, atomic_write_jsonl
from fspo.data.schema import Episode, User
from fspo.data.template import TemplateOptions, parse_generation
from fspo.infer.generate import Mode, answer_finished, batch_seed, generate_batch, prompt_ids

SETTINGS = ("system", "mode", "shots", "max_new_tokens", "temperature", "top_p", "seed")


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


def _resume(out: Path, settings: dict[str, Any]) -> dict[str, dict]:
    """Records already generated with the same settings (final output and/or partial log)."""
    from fspo.eval.records import read_rows

    done: dict[str, dict] = {}
    for path in (out, partial_path(out)):
        if not path.exists():
            continue
        if path == partial_path(out):
            AppendLog(path).close()  # cut a torn last line left by a kill
        for where, rec in read_rows(path):
            theirs = {k: rec.get(k) for k in SETTINGS}
            if theirs != settings:
                raise UserError(
                    f"{where}: generated with other settings {theirs} (now {settings}); "
                    "delete it or write to another --out"
                )
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
    With `out`, episodes already in `out` (or in its ``.partial`` log from a killed run) are skipped.
    """
    mode = Mode(mode)
    if tokenizer.pad_token_id is None:  # batching pads; eos pads harmlessly (masked out)
        tokenizer.pad_token = tokenizer.eos_token
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
    }
    out_path = Path(out) if out is not None else None
    done = _resume(out_path, settings) if out_path is not None else {}
    todo = [e for e in episodes if e.episode_id not in done]
    encoded = []
    for e in todo:
        desc = e.description or (users[e.user_id].description if users and e.user_id in users else None)
        encoded.append((e, prompt_ids(e, tokenizer, mode, shots, options, desc)))
    encoded.sort(key=lambda item: -len(item[1]))  # similar lengths together: less padding

    log = AppendLog(partial_path(out_path)) if out_path is not None and todo else None
    try:
        batches = range(0, len(encoded), batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"generate {settings['system']}", unit="batch")
        for start in batches:
            chunk = encoded[start : start + batch_size]
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
