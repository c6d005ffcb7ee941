"""Personalized best-of-N: sample N answers for a user from their shots, keep the one the model's own
implicit reward ranks first.

    trained model:   reward(y) = β · [log π(y | shots, x) − log π_ref(y | shots, x)]
    untuned model:   reward(y) = log π(y | shots, x) − log π(y | x)

π is the model answering, given the user's shots (or, in oracle mode, the true description) and the
question x. A trained model's π_ref is the reference of its training (`training_reference`: the
starting model its ``fspo_config.json`` records, and its β), given the same prompt: that is the
implicit reward its IPO/DPO loss shaped, and the one whose accuracy `fspo eval accuracy` measures. A
model without a training record (few-shot prompting of an untuned model) is its own reference, and the
shots are what differs: its in-context log-ratio, β = 1. A zero-shot system has no shots on either side,
so a trained one ranks by its own implicit reward and an untuned one scores every sample 0 (the first
is kept: best-of-N is then one sample). β changes no ranking; it is recorded.

Each answer is scored as training scored its targets: the parsed answer, rendered by the one
template's `render_target` and tokenized with eos, after the prompt without the response heading.

The work is shared: the prompt is prefilled once and its KV cache repeated for the N samples
(`fspo.infer.generate.prefill`), and each model scores all N answers against one pass over its
prompt (`fspo.infer.prefix`: one row ``[prompt | y1 | y2 | ... | yN]``, no answer seeing another).
Sample j of the row named `key` is drawn from `Decoding.row_seed(key, j)`, so sample 0 is the answer
plain sampled decoding gives and the first k samples of a run with N > k are those of a run with k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError
from fspo.core.files import read_fields
from fspo.data.schema import Preference
from fspo.data.template import TemplateOptions, parse_generation, render_generation_prompt, render_target
from fspo.data.tokens import pad_id_of, prompt_token_ids, target_token_ids
from fspo.infer.generate import Decoding, Mode, generate_batch, prefill, prompt_ids_for, template_options
from fspo.infer.layout import CONFIG_FILE
from fspo.infer.logps import eval_mode
from fspo.infer.pairs import ContextTokens, QuestionTokens
from fspo.infer.prefix import pair_logps

SELF = "self"  # the reference name of a model that is its own reference (no training record)


@dataclass(frozen=True)
class Reference:
    """What the implicit reward subtracts: `model`'s log-prob of an answer to the same prompt, or, with
    `model` None (the scored model itself, `SELF`), to the question alone."""

    model: Any
    name: str
    beta: float = 1.0


def training_reference(model_dir: str | Path, ref: str | Path | None = None) -> tuple[str | None, float]:
    """(reference folder, β) of the model in `model_dir`: the starting model and β of its training, read
    from its ``fspo_config.json``; `ref` replaces the folder. (`ref`, 1.0) for a folder without that
    file: an untrained model, its own reference when `ref` is None.

    A recorded starting model that is not a folder from here (a run made elsewhere, a hub id) is a
    `UserError` naming the file and field, and saying to pass `--ref`.
    """
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return (str(ref) if ref is not None else None), 1.0
    config = read_fields(path)
    beta = config.get("beta", 1.0)
    if not isinstance(beta, int | float) or isinstance(beta, bool) or beta <= 0:
        raise UserError(f"config file {str(path)!r}: field 'beta': expected a positive number, got {beta!r}")
    if ref is not None:
        return str(ref), float(beta)
    start = config.get("model")
    found = next((p for p in _recorded_where(Path(model_dir), config, start) if Path(p).is_dir()), None)
    if found is None:
        raise UserError(
            f"config file {str(path)!r}: field 'model': the reference {start!r} (the model training "
            "started from) is not a model folder here; pass --ref PATH"
        )
    return found, float(beta)


def _recorded_where(model_dir: Path, config: dict[str, Any], start: Any) -> list[str]:
    """Where the starting model `start` recorded in `model_dir`'s config may be now, best first.

    The config records absolute paths. When the run folder (its ``out``) was moved or copied with its
    neighbours, as a whole quickstart folder is, the starting model beside it moved too: that copy
    comes first, so a copied folder never reads the original's models. Then the recorded path itself
    (only this run was moved, or the model lies outside its tree)."""
    if not isinstance(start, str):
        return []
    out = config.get("out")
    if not isinstance(out, str) or not Path(out).is_absolute() or not Path(start).is_absolute():
        return [start]
    old_root = Path(out).parent
    here = next((d for d in (model_dir, model_dir.parent) if d.name == Path(out).name), None)
    if here is None or not Path(start).is_relative_to(old_root):
        return [start]
    moved = here.resolve().parent / Path(start).relative_to(old_root)
    return [str(moved), start] if moved != Path(start) else [start]


@dataclass(frozen=True)
class BestOf:
    """The N samples of one question, their scores and the one kept (`best`)."""

    new_ids: list[list[int]]  # each sample's generated token ids
    raws: list[str]
    answers: list[str]  # parsed, as `parse_generation` cuts them
    logps: list[float]  # log π(y | prompt)
    ref_logps: list[float]  # log π_ref(y | question)
    rewards: list[float]  # β (logps − ref_logps)
    best: int  # index of the highest reward (the first of equals)
    scored_tokens: int  # tokens the two scoring passes read (prompts and answers)

    @property
    def generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.new_ids)


def answer_logps(
    model: Any, tokenizer: Any, prompt: Sequence[int], targets: Sequence[list[int]]
) -> list[float]:
    """log π(target | prompt) of every target, all against one pass over `prompt` (`pair_logps`'s
    shared row, two answers a question slot with no question text)."""
    pairs = [targets[i : i + 2] for i in range(0, len(targets), 2)]
    items = [QuestionTokens((), p[0], p[1] if len(p) > 1 else ()) for p in pairs]
    with eval_mode(model):
        first, second = pair_logps(model, [ContextTokens(list(prompt), items)], pad_id_of(tokenizer))
    both = [v for pair in zip(first.sum.tolist(), second.sum.tolist(), strict=True) for v in pair]
    return both[: len(targets)]


def check_best_of(n: int, decoding: Decoding, mode: Mode | str) -> None:
    """A `UserError` unless best-of-`n` can run: n >= 1, and above 1 sampled answers (greedy ones would
    all be one) in plain or oracle mode (RAT's descriptions are not scored)."""
    if n < 1:
        raise UserError(f"best-of-N: n must be at least 1, got {n}")
    if n > 1 and Mode(mode) is Mode.RAT:
        raise UserError(f"best-of-{n} ranks answers of plain or oracle mode, not rat")
    if n > 1 and not decoding.sampled:
        raise UserError(f"best-of-{n} needs sampled decoding (temperature > 0), got {decoding.describe()}")


def _shared(model: Any, ids: list[int], rows: int, cache: Any) -> Any:
    """The KV cache the `rows` samples of prompt `ids` start from: `cache` (a prefix's) repeated, or a
    prefill of all but the last token (which `generate` needs to feed itself)."""
    if cache is not None:
        cache.batch_repeat_interleave(rows)
        return cache
    return prefill(model, ids[:-1], rows=rows) if len(ids) > 1 else None


def best_of_n(
    model: Any,
    tokenizer: Any,
    shots: Sequence[Preference],
    question: str,
    *,
    n: int,
    decoding: Decoding,
    key: str,
    reference: Reference,
    max_new_tokens: int,
    mode: Mode | str = Mode.PLAIN,
    options: TemplateOptions | None = None,
    description: str | None = None,
    cache: Any = None,
) -> BestOf:
    """Sample `n` answers to `question` for the user behind `shots` and rank them by the implicit
    reward (see the module). `key` names the question in the seeds (an episode id). `cache`, a KV
    cache of the prompt's first tokens for one row (the server's per-user prefix cache; extended in
    place), replaces the prefill of the prompt."""
    mode = Mode(mode)
    if mode is Mode.RAT:
        raise UserError("best-of-N ranks answers of plain or oracle mode, not rat")
    check_best_of(n, decoding, mode)
    ids = prompt_ids_for(shots, question, tokenizer, mode, options, description)
    new_ids = generate_batch(
        model,
        tokenizer,
        [ids] * n,
        rat=False,
        max_new_tokens=max_new_tokens,
        decoding=decoding,
        seeds=[decoding.row_seed(key, j) for j in range(n)],
        cache=_shared(model, ids, n, cache),
    )
    raws = [tokenizer.decode(row, skip_special_tokens=True) for row in new_ids]
    answers = [parse_generation(raw).answer for raw in raws]
    layout = template_options(mode, options)
    targets = [target_token_ids(tokenizer, render_target(a, layout)) for a in answers]
    prompt = prompt_token_ids(
        tokenizer, render_generation_prompt(shots, question, layout, tokenizer, description)
    )
    if reference.model is None:  # its own reference: the same model without the shots
        plain = template_options(Mode.PLAIN, options)
        ref_prompt = prompt_token_ids(tokenizer, render_generation_prompt([], question, plain, tokenizer))
    else:  # the reference of its training, on the prompt it was trained on
        ref_prompt = prompt
    logps = answer_logps(model, tokenizer, prompt, targets)
    ref_model = model if reference.model is None else reference.model  # the same tokenizer
    same = ref_model is model and ref_prompt == prompt  # a zero-shot model that is its own reference
    ref_logps = logps if same else answer_logps(ref_model, tokenizer, ref_prompt, targets)
    answers_len = sum(map(len, targets))
    rewards = [reference.beta * (a - b) for a, b in zip(logps, ref_logps, strict=True)]
    return BestOf(
        new_ids=new_ids,
        raws=raws,
        answers=answers,
        logps=logps,
        ref_logps=ref_logps,
        rewards=rewards,
        best=max(range(n), key=rewards.__getitem__),
        scored_tokens=(len(prompt) + answers_len) + (0 if same else len(ref_prompt) + answers_len),
    )
