"""Where the shots end: the leading prompt tokens that every question of one user's shots shares.

Training puts up to K questions of one user in one row behind a single copy of the shots
(`fspo.train.contexts`), and the server keeps a user's prefilled shots in its KV cache
(`fspo.serve.answerers`); both need the same thing, the ids before the query's question block. One
definition serves both, so a prefix the server caches is the one training shared.

The cut is at the query's ``## Question`` block, the last one in the prompt (the template escapes
headings inside user text, `fspo.data.template.as_data`). Everything before it, the shots and the
task sentence (and a chat template's header), is shared. The ids of that text are taken as the
common prefix of the whole prompt's ids and the shared text's own ids, so a pair scored behind a
shared prefix has exactly the ids it has alone, even where a tokenizer merges across the cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fspo.data.schema import Preference
from fspo.data.template import QUESTION, TemplateOptions, as_data, render_generation_prompt
from fspo.data.tokens import prompt_token_ids
from fspo.infer.generate import Mode, template_options


def shots_end(
    tokenizer: Any,
    prompt: str,
    prompt_ids: Sequence[int],
    question: str,
    memo: dict[str, list[int]] | None = None,
) -> int:
    """How many leading ids of `prompt_ids` (the ids of `prompt`) encode only the text before the
    query `question`'s block. 0 when that block is not found or nothing would follow the cut.

    `memo` keeps the last shared text's ids: the K questions of one user are adjacent in an episodes
    file and share that text, so it is tokenized once for them (one entry, not the whole corpus).
    """
    cut = prompt.rfind(QUESTION + as_data(question))
    if cut <= 0:
        return 0
    text = prompt[:cut]
    ids = memo.get(text) if memo is not None else None
    if ids is None:
        ids = prompt_token_ids(tokenizer, text)
        if memo is not None:
            memo.clear()
            memo[text] = ids
    n = 0
    for a, b in zip(ids, prompt_ids, strict=False):
        if a != b:
            break
        n += 1
    return n if n < len(prompt_ids) else 0


def shots_prefix_ids(
    shots: Sequence[Preference],
    question: str,
    tokenizer: Any,
    mode: Mode | str = Mode.PLAIN,
    options: TemplateOptions | None = None,
    description: str | None = None,
) -> list[int]:
    """The leading ids of the generation prompt (`fspo.infer.generate.prompt_ids_for`, same arguments)
    that every question asked with these shots shares: what a server caches per user."""
    text = render_generation_prompt(
        shots, question, template_options(mode, options), tokenizer, description=description
    )
    ids = prompt_token_ids(tokenizer, text)
    return ids[: shots_end(tokenizer, text, ids, question)]
