"""Generation from rendered FSPO prompts: the prompt ids of a mode, one batched `model.generate`.

The prompt is the one template's `render_generation_prompt`, so generation sees exactly the text
training saw. In ``plain`` and ``oracle`` modes the response heading is appended *as token ids*
after the prompt ids (prompt and heading tokenized separately, as training tokenizes prompt and
target separately) so that the model continues from the same token boundary it learned; in ``rat``
mode the model writes ``## User Description`` itself, then the response heading and the answer.

Generation is `model.generate` (KV cache, left padding, greedy or seeded sampling) with one extra
stopping rule: a row stops once its answer has a line starting with '#', since a model that keeps
going starts another example. `parse_generation` then cuts the answer there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from fspo.core.errors import DataError
from fspo.data.schema import Episode, Preference
from fspo.data.template import (
    DESCRIPTION,
    PREFERRED,
    RESPONSE,
    DescriptionMode,
    TemplateOptions,
    render_generation_prompt,
    response_heading_ids,
)
from fspo.data.tokens import pad_id_of, prompt_token_ids


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


def prompt_ids_for(
    shots: Sequence[Preference],
    question: str,
    tokenizer: Any,
    mode: Mode | str = Mode.PLAIN,
    options: TemplateOptions | None = None,
    description: str | None = None,
) -> list[int]:
    """Token ids the model continues to answer `question` for the user behind `shots`: the rendered
    prompt, plus the response heading unless RAT.

    The one rendering of evaluation (`prompt_ids`) and serving, where a question comes without a
    chosen/rejected pair and so is no `Episode`. `description` is needed in oracle mode only.
    """
    mode = Mode(mode)
    if mode is Mode.ORACLE and not description:
        raise DataError("oracle mode needs the user's description (none given)")
    opts = template_options(mode, options)
    text = render_generation_prompt(shots, question, opts, tokenizer, description=description)
    ids = prompt_token_ids(tokenizer, text)  # exactly as training tokenizes prompts
    if mode is not Mode.RAT:
        ids += response_heading_ids(opts, tokenizer)  # as in training targets, not tokenized alone
    return ids


def prompt_ids(
    episode: Episode,
    tokenizer: Any,
    mode: Mode | str = Mode.PLAIN,
    shots: int | None = None,
    options: TemplateOptions | None = None,
    description: str | None = None,
) -> list[int]:
    """`prompt_ids_for` the episode's query question, from its first `shots` shots (None: all)."""
    mode = Mode(mode)
    used = episode.shots if shots is None else episode.shots[:shots]
    desc = description or episode.description
    if mode is Mode.ORACLE and not desc:
        raise DataError(
            f"episode {episode.episode_id!r}: oracle mode needs the user's description (none found)"
        )
    return prompt_ids_for(used, episode.query.question, tokenizer, mode, options, desc)


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


def description_finished(text: str) -> bool:
    """Whether a RAT continuation's description is whole: a line follows the description's, or the
    model skipped it and started the response heading."""
    pos = text.find(DESCRIPTION.strip())
    if pos < 0:
        return any(heading.strip() in text for heading in (PREFERRED, RESPONSE))
    rest = text[pos + len(DESCRIPTION) :]
    return "\n" in rest.lstrip("\n")


def stopping_criteria(tokenizer: Any, prompt_len: int, rat: bool, description_only: bool = False) -> Any:
    import torch
    from transformers import StoppingCriteria

    class StopAtHeading(StoppingCriteria):
        """Per row: stop once the answer is followed by a markdown heading (or, `description_only`,
        once RAT's description is written)."""

        def __call__(
            self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
        ) -> torch.BoolTensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            done = [description_finished(t) if description_only else answer_finished(t, rat) for t in texts]
            return torch.tensor(done, device=input_ids.device)

    return StopAtHeading()


def batch_seed(seed: int, episode_ids: Sequence[str]) -> int:
    # Seeded by the batch's content, not its position, so a resumed run samples the same way.
    blob = f"{seed}:{'|'.join(episode_ids)}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")


def cache_kwarg(model: Any) -> str:
    """The name under which `model` takes a KV cache: ``cache`` in recent transformers 5.x releases
    (which warn on the old name), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
    cache: Any = None,
    streamer: Any = None,
    description_only: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt of `batch` (left-padded, KV-cached `model.generate`).

    `description_only` (RAT prompts) stops each row once its user description is written.

    `cache` (a KV cache of the first tokens of a batch of one, e.g. a user's shots prefilled once
    by the server; `model.generate` extends it in place) and `streamer` (a transformers
    `BaseStreamer`) go to `model.generate` as they are.
    """
    import torch

    width = max(len(ids) for ids in batch)
    pad = pad_id_of(tokenizer)  # a tokenizer without a pad token pads with eos (masked out)
    device = getattr(model, "device", None)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    if streamer is not None:
        kwargs["streamer"] = streamer
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
            stopping_criteria=[stopping_criteria(tokenizer, width, rat, description_only)],
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
