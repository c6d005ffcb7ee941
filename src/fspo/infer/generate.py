"""Generation from rendered FSPO prompts: the prompt ids of a mode, one batched `model.generate`.

The prompt is the one template's `render_generation_prompt`, so generation sees exactly the text
training saw. In ``plain`` and ``oracle`` modes the response heading is appended *as token ids*
after the prompt ids (prompt and heading tokenized separately, as training tokenizes prompt and
target separately) so that the model continues from the same token boundary it learned; in ``rat``
mode the model writes ``## User Description`` itself, then the response heading and the answer.

Generation is `model.generate` (KV cache, left padding) with one extra stopping rule: a row stops
once its answer has a line starting with '#', since a model that keeps going starts another example.
`parse_generation` then cuts the answer there. How each token is chosen is one setting, `Decoding`
(greedy or sampled, with transformers' repetition penalty and no-repeat n-gram rule); a sampled row
draws from its own seed, so its answer does not depend on the rows it shares a batch with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fspo.core.errors import DataError, UserError
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


class Decoding(BaseModel):
    """How each next token of an answer is chosen: one setting, the same for every system compared.

    ``temperature`` 0 is greedy (the most likely token); above 0 each token is drawn from the model's
    distribution at that temperature, within the smallest set of tokens holding ``top_p`` of its
    mass (no top-k). ``repetition_penalty`` (CTRL, Keskar et al. 2019: the logit of a token already
    in the answer is divided by it when positive, multiplied when negative) and
    ``no_repeat_ngram_size`` (no n tokens occur twice in the answer) are transformers' own
    processors, applied to the answer's tokens only: the shots' phrasing is the user's, which an
    answer should be free to reuse, and padding must not make an answer depend on its batch.

    A sampled row draws its tokens from `row_seed` (``seed``, the row's key, the sample's index),
    never from a random state shared by the batch; see `generate_batch`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="0 = greedy; > 0 samples")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off; greedy: 1)")
    repetition_penalty: float = Field(
        1.0, ge=1.0, allow_inf_nan=False, description="> 1 lowers tokens the answer already has (1 = off)"
    )
    no_repeat_ngram_size: int = Field(0, ge=0, description="n > 0: no n-gram twice in an answer (0 = off)")
    seed: int = Field(0, description="sampling seed; each episode's and each sample's seed is drawn from it")

    @field_validator("top_p")
    @classmethod
    def _greedy_has_no_top_p(cls, top_p: float, info: ValidationInfo) -> float:
        # Greedy decoding is one decoding whatever top-p was asked with (an API request may carry
        # one): it is recorded as 1, so greedy records of any top-p compare equal on resume.
        return 1.0 if info.data.get("temperature") == 0.0 else top_p

    @classmethod
    def of(cls, where: str, **values: Any) -> Decoding:
        """`Decoding(**values)`, with a bad value reported as one `UserError` naming `where` and the field."""
        try:
            return cls(**values)
        except ValidationError as err:
            problems = "; ".join(
                f"field '{'.'.join(map(str, e['loc'])) or 'decoding'}': {e['msg']} (got {e['input']!r})"
                for e in err.errors()
            )
            raise UserError(f"{where}: invalid decoding: {problems}") from None

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def row_seed(self, key: str, sample: int = 0) -> int:
        """The seed of sample `sample` of the row named `key` (an episode id): a hash of the three, so
        it is the same in any batch, any order and after a resume."""
        blob = f"{self.seed}:{key}:{sample}".encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1  # < 2**63

    def describe(self) -> str:
        """One line for reports: ``greedy`` or ``sampled (temperature 0.7, top-p 0.9, seed 0)``, plus
        the repetition controls in use."""
        text = f"sampled (temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed})"
        parts = [text if self.sampled else "greedy"]
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition penalty {self.repetition_penalty:g}")
        if self.no_repeat_ngram_size:
            parts.append(f"no repeated {self.no_repeat_ngram_size}-grams")
        return ", ".join(parts)


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


def prefill(model: Any, ids: Sequence[int], rows: int = 1) -> Any:
    """A KV cache of `ids` from one forward pass, repeated for `rows` rows: what `generate_batch`
    extends when every row of its batch starts with `ids` (N samples of one prompt share one prefill)."""
    import torch
    from transformers import DynamicCache

    kv = DynamicCache(config=model.config)
    with torch.no_grad():
        prompt = torch.tensor([list(ids)], device=model.device)
        model(input_ids=prompt, use_cache=True, **{cache_kwarg(model): kv})
    if rows > 1:
        kv.batch_repeat_interleave(rows)
    return kv


def logits_processors(decoding: Decoding, answer_start: int, seeds: Sequence[int]) -> list[Any]:
    """The transformers logits processors of `decoding` for a batch whose answers start at column
    `answer_start` of `model.generate`'s ids, with one sampling seed per row.

    The penalties are transformers' `RepetitionPenaltyLogitsProcessor` and
    `NoRepeatNGramLogitsProcessor` shown only the answer's columns; temperature and top-p are its
    warpers. Sampling is the argmax of the warped scores plus Gumbel noise (argmax(s + G) with
    G ~ Gumbel(0, 1) per token is a draw from softmax(s)), each row's noise from its own
    `torch.Generator`: `model.generate`'s own sampler draws every row from one random state, so a
    row's answer would change with the rows beside it, and transformers has no per-row seed.
    """
    import torch
    from transformers import (
        LogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    class AnswerOnly(LogitsProcessor):
        def __init__(self, inner: LogitsProcessor):
            self.inner = inner

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            return self.inner(input_ids[:, answer_start:], scores)

    class SeededDraw(LogitsProcessor):
        def __init__(self) -> None:
            self.generators: list[torch.Generator] = []

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if not self.generators:
                self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in seeds]
            size, dev = scores.shape[-1], scores.device
            u = torch.stack([torch.rand(size, generator=g, device=dev) for g in self.generators])
            gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(u.dtype).tiny)))
            return scores.float() + gumbel

    out: list[Any] = []
    if decoding.repetition_penalty != 1.0:
        out.append(AnswerOnly(RepetitionPenaltyLogitsProcessor(float(decoding.repetition_penalty))))
    if decoding.no_repeat_ngram_size:
        out.append(AnswerOnly(NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size)))
    if decoding.sampled:
        out.append(TemperatureLogitsWarper(float(decoding.temperature)))
        if decoding.top_p < 1.0:
            out.append(TopPLogitsWarper(float(decoding.top_p)))
        out.append(SeededDraw())
    return out


def generate_batch(
    model: Any,
    tokenizer: Any,
    batch: Sequence[list[int]],
    *,
    rat: bool,
    max_new_tokens: int,
    decoding: Decoding | None = None,
    seeds: Sequence[int] | None = None,
    cache: Any = None,
    streamer: Any = None,
    description_only: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt of `batch` (left-padded, KV-cached `model.generate`).

    `decoding` chooses the tokens (default greedy). A sampled row draws from `seeds[i]` (default:
    `decoding.row_seed("", i)`), so its answer depends on its prompt and seed alone.
    `description_only` (RAT prompts) stops each row once its user description is written.

    `cache` (a KV cache of the first tokens every row shares, e.g. a user's shots prefilled once by
    the server, or `prefill`; `model.generate` extends it in place) and `streamer` (a transformers
    `BaseStreamer`) go to `model.generate` as they are.
    """
    import torch

    decoding = decoding or Decoding()
    seeds = [decoding.row_seed("", i) for i in range(len(batch))] if seeds is None else list(seeds)
    if len(seeds) != len(batch):
        raise ValueError(f"{len(seeds)} seeds for {len(batch)} rows")
    width = max(len(ids) for ids in batch)
    pad = pad_id_of(tokenizer)  # a tokenizer without a pad token pads with eos (masked out)
    device = getattr(model, "device", None)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    kwargs: dict[str, Any] = {}
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    if streamer is not None:
        kwargs["streamer"] = streamer
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            # the choice of token is `logits_processors`' alone: transformers' own sampler and
            # penalties stay off, whatever the model's generation_config.json asks for
            do_sample=False,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            logits_processor=logits_processors(decoding, width, seeds),
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
