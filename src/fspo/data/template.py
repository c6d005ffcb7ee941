"""The one prompt template: renders an episode for training, evaluation and serving alike.

The default reproduces the layout of the official FSPO code byte for byte, so data made for the
paper's code works here and the other way round:

    # Example 1
    ## Question \n<question>
    ## Preferred Response \n<chosen>
    ## Dispreferred Response \n<rejected>
    <blank line>
    ...
    # Task
    <instruction sentence>
    ## Question \n<query question>

and the two targets both start with the same heading (``## Preferred Response \n``, or
``## Response \n`` when dispreferred answers are left out) so that only the answer text differs.
Headings carry a trailing space, as in the official code; ``## User Description`` does not.

Description modes (`DescriptionMode`):
  * ``none``   – no user description anywhere;
  * ``target`` – RAT: each target is ``## User Description\\n<description>\\n`` then the response;
  * ``prompt`` – the description ends the prompt: RAT's teacher-forced variant in training and the
    *oracle* baseline in evaluation (the true description is given);
  * ``only``   – each target is ``## User Description\\n<description>\\n`` alone: RAT's description
    pairs, where the preference is between two descriptions of one user and nothing else. With the
    answers after them (``target``), a minimal pair's answers alone reach IPO's target margin and
    the descriptions get no push.

Why hand-written: the layout *is* FSPO's data format; no library renders it. Chat templates (for
instruct models) come from the tokenizer via `apply_chat_template`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from fspo.data.schema import Episode, Preference

PREFERRED = "## Preferred Response \n"
DISPREFERRED = "## Dispreferred Response \n"
RESPONSE = "## Response \n"
QUESTION = "## Question \n"
DESCRIPTION = "## User Description\n"
TASK = "# Task\n"

TASK_ZERO_SHOT = "Generate a response to the following question."
TASK_RAT_PREFERRED = (
    "Generate a user description based on the examples above. "
    "Then, generate a preferred response to the following question."
)
TASK_RAT = (
    "Generate a user description based on the examples above. "
    "Then, generate a response to the following question."
)
TASK_PREFERRED = "Given the examples above, generate a preferred response to the following question."
TASK_PLAIN = "Given the examples above, generate a response to the following question."


class DescriptionMode(StrEnum):
    NONE = "none"
    TARGET = "target"  # RAT: the model writes the description, then the answer
    PROMPT = "prompt"  # teacher-forced RAT / oracle: the description ends the prompt
    ONLY = "only"  # RAT's description pairs: the targets are the two descriptions alone


class TemplateOptions(BaseModel):
    """How an episode becomes text. The defaults are the official FSPO layout without RAT."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include_dispreferred: bool = True
    description: DescriptionMode = DescriptionMode.NONE
    # Token budget for prompt + the longer target; whole shots are dropped (oldest first) to fit.
    max_tokens: int | None = None
    # Wrap the prompt in the tokenizer's chat template (instruct models).
    chat_template: bool = False

    @classmethod
    def of_training(
        cls, *, include_dispreferred: bool, rat: str, chat_template: bool, max_tokens: int | None = None
    ) -> TemplateOptions:
        """The layout a training run renders its episodes in, from its config's fields of these names.

        One mapping for `TrainConfig.template_options` and for reading a trained model's saved config
        (`fspo.infer.layout`), so a model is prompted at evaluation and serving as it was trained.
        RAT's ``teacher-forced`` mode puts the true description in the prompt (`DescriptionMode.PROMPT`).
        """
        if rat not in RAT_DESCRIPTION:
            raise ValueError(f"rat: {rat!r} is not one of {', '.join(RAT_DESCRIPTION)}")
        return cls(
            include_dispreferred=include_dispreferred,
            description=RAT_DESCRIPTION[rat],
            max_tokens=max_tokens,
            chat_template=chat_template,
        )


# A training config's `rat` mode -> where the user description goes in the episode's text.
RAT_DESCRIPTION = {
    "none": DescriptionMode.NONE,
    "target": DescriptionMode.TARGET,
    "teacher-forced": DescriptionMode.PROMPT,
    "description": DescriptionMode.ONLY,
}


@dataclass(frozen=True)
class Rendered:
    """An episode as text: the prompt and the two targets, plus what the token budget cost."""

    prompt: str
    chosen: str
    rejected: str
    shots_used: int
    shots_dropped: int
    over_budget: bool = False  # even with every shot dropped the episode does not fit


def response_heading(options: TemplateOptions) -> str:
    return PREFERRED if options.include_dispreferred else RESPONSE


def response_heading_ids(options: TemplateOptions, tokenizer: Any) -> list[int]:
    """The heading's token ids *as they appear in a training target*, i.e. with an answer after it.

    Byte-level BPE tokenizers with GPT-2-style pre-tokenization (SmolLM2, Llama 3, Qwen) split the
    heading's trailing ``" \n"`` into ``" "`` + ``"\n"`` when text follows it, but merge it into one
    token at the end of a string. Generation prompts end with the heading, so tokenizing it alone
    gives the model a token it never saw there in training, and a fine-tuned model then "closes"
    the empty answer (``"\n##"``). Tokenizing heading + a sentinel answer character and keeping the
    ids that decode to the heading reproduces the training tokenization; tokenizers where no
    prefix decodes exactly (e.g. SentencePiece's leading-space handling) fall back to the heading alone.
    """
    heading = response_heading(options)
    ids = tokenizer(heading + "x", add_special_tokens=False)["input_ids"]
    for k in range(len(ids), 0, -1):
        if tokenizer.decode(ids[:k]) == heading:
            return list(ids[:k])
    return list(tokenizer(heading, add_special_tokens=False)["input_ids"])


def task_sentence(num_shots: int, options: TemplateOptions) -> str:
    with_description = options.description is not DescriptionMode.NONE
    if num_shots == 0:
        return TASK_ZERO_SHOT
    if with_description:
        return TASK_RAT_PREFERRED if options.include_dispreferred else TASK_RAT
    return TASK_PREFERRED if options.include_dispreferred else TASK_PLAIN


def as_data(text: str) -> str:
    """`text` stripped, line ends made ``\\n``, and every line whose first non-blank character is '#'
    escaped by a backslash right before that '#' (``"  # x"`` -> ``"  \\# x"``).

    Why: headings are the layout. A question or answer holding a line such as ``# Task`` or
    ``## Preferred Response`` would otherwise change which parts of the episode the model reads as
    shots, query and answer (a person's text at the server, an LLM's markdown in synthetic data).
    A lone ``\\r`` starts a line for a reader as much as ``\\n`` does, and markdown still reads a
    heading indented by a few spaces, so both are handled. Text with ``\\n`` line ends and no such
    lines, which is all simulated and released data, renders byte for byte as before.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    return "\n".join(_escape_heading(line) for line in lines)


def _escape_heading(line: str) -> str:
    body = line.lstrip()
    if not body.startswith("#"):
        return line
    return line[: len(line) - len(body)] + "\\" + body


def render_context(
    shots: Sequence[Preference],
    question: str,
    options: TemplateOptions,
    description: str | None = None,
) -> str:
    """The prompt text (before any chat wrapping) for `question` given a user's `shots`.

    `description` is only used in ``prompt`` mode (teacher-forced RAT, oracle), where it is required.
    """
    parts: list[str] = []
    for i, shot in enumerate(shots, start=1):
        parts.append(f"# Example {i}\n")
        parts.append(QUESTION + as_data(shot.question) + "\n")
        if options.include_dispreferred:
            parts.append(PREFERRED + as_data(shot.chosen) + "\n")
            parts.append(DISPREFERRED + as_data(shot.rejected) + "\n")
        else:
            parts.append(RESPONSE + as_data(shot.chosen) + "\n")
        parts.append("\n")
    parts.append(TASK)
    parts.append(task_sentence(len(shots), options) + "\n")
    parts.append(QUESTION + as_data(question) + "\n")
    if options.description is DescriptionMode.PROMPT:
        if not description:
            raise ValueError(
                "description mode 'prompt' (teacher-forced RAT / oracle) needs a user description"
            )
        parts.append(DESCRIPTION + as_data(description) + "\n")
    return "".join(parts)


def render_target(answer: str, options: TemplateOptions, description: str | None = None) -> str:
    """A target continuation: ``[## User Description\\n<d>\\n]## Preferred Response \\n<answer>\\n``,
    or in ``only`` mode the description part alone."""
    if options.description is DescriptionMode.ONLY:
        if not description:
            raise ValueError("description mode 'only' (RAT's description pairs) needs a description")
        return DESCRIPTION + as_data(description) + "\n"
    target = response_heading(options) + as_data(answer) + "\n"
    if options.description is DescriptionMode.TARGET:
        if not description:
            raise ValueError("description mode 'target' (RAT) needs a user description for the target")
        target = DESCRIPTION + as_data(description) + "\n" + target
    return target


def wrap_chat(prompt: str, tokenizer: Any) -> str:
    """Put the rendered prompt in the tokenizer's chat template as one user turn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _count_tokens(text: str, tokenizer: Any) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def rejected_description(episode: Episode) -> str | None:
    """The description RAT's rejected target carries: the rejected answer's persona's when the query
    knows it (the official layout), else the user's own (then the description tokens cancel in the
    preference margin; `fspo.train.tokenize.RenderStats` counts such episodes)."""
    return episode.query.rejected_description or episode.description


def render(episode: Episode, options: TemplateOptions | None = None, tokenizer: Any = None) -> Rendered:
    """Render an episode into (prompt, chosen, rejected).

    In RAT's ``target`` mode the chosen target carries the user's description and the rejected one
    `rejected_description(episode)`. With `options.max_tokens`, whole shots are dropped, oldest first,
    until prompt + longer target fit; the query is never dropped. Needs a `tokenizer` for the budget
    and for chat wrapping.
    """
    options = options or TemplateOptions()
    desc = episode.description
    chosen = render_target(episode.query.chosen, options, desc)
    rejected = render_target(episode.query.rejected, options, rejected_description(episode))

    def build(shots: Sequence[Preference]) -> str:
        prompt = render_context(shots, episode.query.question, options, desc)
        return wrap_chat(prompt, tokenizer) if options.chat_template else prompt

    shots = list(episode.shots)
    if options.chat_template and tokenizer is None:
        raise ValueError("chat_template=True needs a tokenizer")
    if options.max_tokens is None:
        return Rendered(build(shots), chosen, rejected, len(shots), 0)
    if tokenizer is None:
        raise ValueError("a token budget (max_tokens) needs a tokenizer to count tokens")

    target_len = max(_count_tokens(chosen, tokenizer), _count_tokens(rejected, tokenizer))
    dropped = 0
    prompt = build(shots)
    while _count_tokens(prompt, tokenizer) + target_len > options.max_tokens and shots:
        shots.pop(0)  # oldest first; the remaining shots are renumbered from 1
        dropped += 1
        prompt = build(shots)
    over = _count_tokens(prompt, tokenizer) + target_len > options.max_tokens
    return Rendered(prompt, chosen, rejected, len(shots), dropped, over_budget=over)


def render_generation_prompt(
    shots: Sequence[Preference],
    question: str,
    options: TemplateOptions | None = None,
    tokenizer: Any = None,
    description: str | None = None,
) -> str:
    """The prompt a model continues to answer `question` for the user behind `shots` (eval, serving).

    In ``target`` (RAT) mode the model writes ``## User Description`` itself; otherwise callers
    usually append `response_heading(options)` (as token ids, to match training tokenization).
    """
    options = options or TemplateOptions()
    prompt = render_context(shots, question, options, description)
    if options.chat_template:
        if tokenizer is None:
            raise ValueError("chat_template=True needs a tokenizer")
        prompt = wrap_chat(prompt, tokenizer)
    return prompt


@dataclass(frozen=True)
class ParsedGeneration:
    description: str | None
    answer: str


def parse_generation(text: str) -> ParsedGeneration:
    """Split a model continuation into (description, answer).

    Accepts the continuation with or without the headings (the caller may have put the response
    heading in the prompt). The answer ends at the first line that starts a new markdown heading
    (``#``), since a model that keeps going usually starts another example.
    """
    description = None
    rest = text
    if DESCRIPTION.strip() in rest:
        _, _, after = rest.partition(DESCRIPTION.strip())
        desc_part, sep, rest = _split_at_heading(after.lstrip("\n"))
        description = desc_part.strip() or None
        if not sep:
            return ParsedGeneration(description, "")
    for heading in (PREFERRED.strip(), RESPONSE.strip()):
        if rest.lstrip().startswith(heading):
            rest = rest.lstrip()[len(heading) :]
            break
    answer, _, _ = _split_at_heading(rest.lstrip(" \n"))
    return ParsedGeneration(description, answer.strip())


def _split_at_heading(text: str) -> tuple[str, str, str]:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("#"):
            return "\n".join(lines[:i]), "\n", "\n".join(lines[i:])
    return text, "", ""
