"""Personalized generation of a test set: answer each episode's query for its user, from that user's shots.

Prompts and decoding are `fspo.infer.generate`'s (the same path serving uses); `best_of` > 1 keeps
the best of N sampled answers by the model's implicit reward (`fspo.infer.best_of`). Outputs are
JSONL, one record per episode, written atomically at the end; finished batches go to an append log
beside the output first, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fspo.core.errors import DataError, UserError
from fspo.core.files import AppendLog, atomic_write_jsonl, json_lines
from fspo.data.schema import Episode, User
from fspo.data.template import TemplateOptions, parse_generation
from fspo.infer.best_of import SELF, Reference, best_of_n, check_best_of
from fspo.infer.generate import Decoding, Mode, answer_finished, generate_batch, prompt_ids

# Everything that decides a record's text. `batch_size` is among them: it decides which episodes
# share a batch, hence the padding (a sampled row's seed is its episode's, whatever its batch).
# `reference` and `beta` are best-of-N's (None for one answer).
SETTINGS = (
    "system",
    "mode",
    "shots",
    "max_new_tokens",
    "decoding",
    "best_of",
    "reference",
    "beta",
    "batch_size",
)

Batch = list[tuple[Episode, list[int]]]  # episodes decoded together, with their prompt ids


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
    from fspo.eval.readers import read_rows

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


def _description(episode: Episode, users: dict[str, User] | None) -> str | None:
    if episode.description:
        return episode.description
    user = users.get(episode.user_id) if users else None
    return user.description if user else None


def _plan(
    episodes: Sequence[Episode],
    tokenizer: Any,
    mode: Mode,
    shots: int | None,
    options: TemplateOptions | None,
    users: dict[str, User] | None,
    batch_size: int,
) -> list[Batch]:
    """The batches of a run, planned over *all* its episodes, done or not (longest prompts first:
    less padding), so that a resumed run decodes every batch it still needs exactly as an
    uninterrupted run would: same rows, same padding."""
    encoded = [(e, prompt_ids(e, tokenizer, mode, shots, options, _description(e, users))) for e in episodes]
    encoded.sort(key=lambda item: -len(item[1]))  # stable: ties keep the input order
    return [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]


def _batch_records(
    model: Any, tokenizer: Any, chunk: Batch, settings: dict[str, Any], decoding: Decoding
) -> list[dict[str, Any]]:
    """One answer per episode of `chunk`, decoded as one batch (a sampled row from its episode's seed)."""
    new = generate_batch(
        model,
        tokenizer,
        [ids for _, ids in chunk],
        rat=settings["mode"] == Mode.RAT,
        max_new_tokens=settings["max_new_tokens"],
        decoding=decoding,
        seeds=[decoding.row_seed(e.episode_id) for e, _ in chunk],
    )
    return [_record(e, row, len(ids), tokenizer, settings) for (e, ids), row in zip(chunk, new, strict=True)]


def _best_of_record(
    model: Any,
    tokenizer: Any,
    episode: Episode,
    n_prompt: int,
    settings: dict[str, Any],
    decoding: Decoding,
    reference: Reference,
    options: TemplateOptions | None,
    users: dict[str, User] | None,
) -> dict[str, Any]:
    """The record of the best of `settings["best_of"]` sampled answers, with every candidate's scores."""
    shots = settings["shots"]
    result = best_of_n(
        model,
        tokenizer,
        episode.shots if shots is None else episode.shots[:shots],
        episode.query.question,
        n=settings["best_of"],
        decoding=decoding,
        key=episode.episode_id,
        reference=reference,
        max_new_tokens=settings["max_new_tokens"],
        mode=settings["mode"],
        options=options,
        description=_description(episode, users),
    )
    rec = _record(episode, result.new_ids[result.best], n_prompt, tokenizer, settings)
    rec["candidates"] = [
        {"answer": answer, "reward": reward, "logp": logp, "ref_logp": ref_logp, "new_tokens": len(ids)}
        for answer, reward, logp, ref_logp, ids in zip(
            result.answers, result.rewards, result.logps, result.ref_logps, result.new_ids, strict=True
        )
    ]
    rec["best_index"] = result.best
    rec["generated_tokens"] = result.generated_tokens
    rec["scored_tokens"] = result.scored_tokens
    return rec


def _decode_missing(
    todo: list[Batch],
    decode: Callable[[Batch], list[dict[str, Any]]],
    done: dict[str, dict],
    out: Path | None,
    progress: str | None,
) -> None:
    """Decode the batches `todo`, adding the records of episodes not yet `done` to it and to `out`'s
    append log as each batch finishes; `progress` is the progress bar's label (None: no bar)."""
    log = AppendLog(partial_path(out)) if out is not None and todo else None
    try:
        if progress:
            from tqdm import tqdm

            todo = tqdm(todo, desc=progress, unit="batch")
        for chunk in todo:
            for rec in decode(chunk):
                if rec["episode_id"] in done:  # kept as first written
                    continue
                done[rec["episode_id"]] = rec
                if log is not None:
                    log.append(rec)
    finally:
        if log is not None:
            log.close()


def generate_for_episodes(
    model: Any,
    tokenizer: Any,
    episodes: Sequence[Episode],
    *,
    mode: Mode | str = Mode.PLAIN,
    shots: int | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    decoding: Decoding | None = None,
    best_of: int = 1,
    reference: Reference | None = None,
    batch_size: int = 8,
    options: TemplateOptions | None = None,
    users: dict[str, User] | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Generate one answer per episode; returns the records (and writes them to `out` if given).

    `shots` keeps each episode's first k shots (None: all). `system` names the system in reports (default:
    the mode). `decoding` (default greedy) is recorded in every record. `best_of` > 1 samples that many
    answers per episode and keeps the one with the highest implicit reward against `reference` (default:
    the model itself without shots); the record adds ``candidates`` (answer, reward, logp, ref_logp,
    new_tokens of each), ``best_index``, ``generated_tokens`` and ``scored_tokens``. `users` supplies
    descriptions for oracle mode when episodes lack them. With `out`, episodes already in `out` or in its
    ``.partial`` append log (a killed run's finished records) are kept, not generated again; the settings
    must match theirs (`UserError` otherwise).
    """
    mode = Mode(mode)
    decoding = decoding or Decoding()
    reference = reference or Reference(None, SELF)
    check_best_of(best_of, decoding, mode)
    if len({e.episode_id for e in episodes}) != len(episodes):
        raise DataError("duplicate episode_id among the episodes to generate for")
    settings = {
        "system": system or mode.value,
        "mode": mode.value,
        "shots": shots,
        "max_new_tokens": max_new_tokens,
        "decoding": decoding.model_dump(),
        "best_of": best_of,
        "reference": reference.name if best_of > 1 else None,
        "beta": reference.beta if best_of > 1 else None,
        "batch_size": batch_size,
    }
    out_path = Path(out) if out is not None else None
    done = _resume(out_path, settings) if out_path is not None else {}
    # A batch is skipped only when every episode in it is done; one a kill cut part-way is decoded
    # again whole and only its missing records are taken, so the output is byte-identical to a run
    # that never stopped. Best-of-N decodes one episode at a time (its N samples are the batch).
    batches = _plan(episodes, tokenizer, mode, shots, options, users, 1 if best_of > 1 else batch_size)

    def decode(chunk: Batch) -> list[dict[str, Any]]:
        if best_of == 1:
            return _batch_records(model, tokenizer, chunk, settings, decoding)
        (episode, ids), *_ = chunk
        args = (settings, decoding, reference, options, users)
        return [_best_of_record(model, tokenizer, episode, len(ids), *args)]

    todo = [chunk for chunk in batches if any(e.episode_id not in done for e, _ in chunk)]
    _decode_missing(todo, decode, done, out_path, f"generate {settings['system']}" if progress else None)
    records = [done[e.episode_id] for e in episodes]
    if out_path is not None:
        atomic_write_jsonl(out_path, records)
        partial_path(out_path).unlink(missing_ok=True)
    return records
