"""Personalized generation: answer each test episode's query for its user, from that user's shots.

The prompt is the one template's `render_generation_prompt`, so evaluation sees exactly the text
training saw. In ``plain`` and ``oracle`` modes the response heading is appended *as token ids*
after the prompt ids (prompt and heading tokenized separately, as training tokenizes prompt and
target separately) so that the model continues from the same token boundary it learned; in ``rat``
mode the model writes ``## User Description`` itself, then the response heading and the answer.

Generation is `model.generate` (KV cache, left padding, greedy or seeded sampling) with one extra
stopping rule: a row stops once its answer has a line starting with '#', since a model that keeps
going starts another example. `parse_generation` then cuts the answer there.

Outputs are JSONL, one record per episode, written atomically at the end; finished batches go to an
append log beside the output first, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from fspo.data.schema import Episode, User
from fspo.data.template import (
    PREFERRED,
    RESPONSE,
    DescriptionMode,
    TemplateOptions,
    parse_generation,
    render_generation_prompt,
    response_heading_ids,
)
from fspo.errors import DataError, UserError
from fspo.files import AppendLog, atomic_write_jsonl
from fspo.train.logps import prompt_token_ids

SETTINGS = ("system", "mode", "shots", "max_new_tokens", "temperature", "top_p", "seed")


class Mode(StrEnum):
    PLAIN = "plain"  # the user's shots, then the answer
    RAT = "rat"  # the model writes a user description, then the answer
    ORACLE = "oracle"  # the true user description ends the prompt


def template_options(mode: Mode | str, base: TemplateOptions | None = None) -> TemplateOptions:
    """The template options of a generation mode (layout options such as chat wrapping kept from `base`)."""
    description = {
        Mode.PLAIN: DescriptionMode.NONE,
        Mode.RAT: DescriptionMode.TARGET,
        Mode.ORACLE: DescriptionMode.PROMPT,
    }[Mode(mode)]
    return (base or TemplateOptions()).model_copy(update={"description": description, "max_tokens": None})


def prompt_ids(
    episode: Episode,
    tokenizer: Any,
    mode: Mode | str = Mode.PLAIN,
    shots: int | None = None,
    options: TemplateOptions | None = None,
    description: str | None = None,
) -> list[int]:
    """Token ids the model continues: the rendered prompt, plus the response heading unless RAT."""
    mode = Mode(mode)
    opts = template_options(mode, options)
    used = episode.shots if shots is None else episode.shots[:shots]
    desc = description or episode.description
    if mode is Mode.ORACLE and not desc:
        raise DataError(
            f"episode {episode.episode_id!r}: oracle mode needs the user's description (none found)"
        )
    text = render_generation_prompt(used, episode.query.question, opts, tokenizer, description=desc)
    ids = prompt_token_ids(tokenizer, text)  # exactly as training tokenizes prompts
    if mode is not Mode.RAT:
        ids += response_heading_ids(opts, tokenizer)  # as in training targets, not tokenized alone
    return ids


def answer_finished(text: str, rat: bool) -> bool:
    """Whether generated `text` already holds a whole answer (a later line starts with '#').

    In RAT mode the answer only starts after the response heading, so headings before it (the
    description's) do not count.
    """
    if rat:
        cut = -1
        for heading in (PREFERRED.strip(), RESPONSE.strip()):
            pos = text.find(heading)
            if pos >= 0 and (cut < 0 or pos < cut):
                cut = pos
        if cut < 0:
            return False
        newline = text.find("\n", cut)
        if newline < 0:
            return False
        text = text[newline + 1 :]
    return text.startswith("#") or "\n#" in text


def _stopping_criteria(tokenizer: Any, prompt_len: int, rat: bool) -> Any:
    import torch
    from transformers import StoppingCriteria

    class StopAtHeading(StoppingCriteria):
        """Per row: stop once the answer is followed by a markdown heading."""

        def __call__(
            self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
        ) -> torch.BoolTensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor([answer_finished(t, rat) for t in texts], device=input_ids.device)

    return StopAtHeading()


def _batch_seed(seed: int, episode_ids: Sequence[str]) -> int:
    # Seeded by the batch's content, not its position, so a resumed run samples the same way.
    blob = f"{seed}:{'|'.join(episode_ids)}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")


def generate_batch(
    model: Any,
    tokenizer: Any,
    batch: Sequence[list[int]],
    *,
    rat: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[list[int]]:
    """New token ids for each prompt of `batch` (left-padded, KV-cached `model.generate`)."""
    import torch

    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=[_stopping_criteria(tokenizer, width, rat)],
            use_cache=True,
            **kwargs,
        )
    rows = []
    for row in out[:, width:].tolist():
        while row and row[-1] == pad and pad != tokenizer.eos_token_id:
            row.pop()
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        rows.append(row)
    return rows


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
                seed=_batch_seed(seed, [e.episode_id for e, _ in chunk]),
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
