"""The served model: one personalized answer for a user's shots and a question, streamed or not.

An *answerer* is what a served `System` asks: it takes a user's shots and a question (`AnswerRequest`)
and returns the personalized `Answer`. (Not an LLM client: `fspo.llm.backends` are the transports of
the judges' and synth's chat calls; an answerer renders FSPO's episode itself and owns the model or
its server.) An answerer renders the request exactly as evaluation does
(`fspo.infer.generate.prompt_ids_for`: the same template, the trained layout from the model's
`fspo_config.json`, the response heading as token ids) and cuts the answer with the same rule
(`answer_finished` stops generation, `parse_generation` cuts), so a served greedy answer equals
`fspo eval generate`'s for the same shots and question.

* `LocalAnswerer` generates in-process (`model.generate`, one generation at a time per model) and
  reuses a user's prefilled shots through `fspo.serve.cache.PrefixCache`.
* `RemoteAnswerer` (``--backend vllm``) sends the same prompt token ids to an OpenAI-compatible
  ``/v1/completions`` server (vLLM, SGLang), which batches requests and caches prefixes itself.

Streaming: `answer(req, on_text)` calls `on_text` with the answer's text as it grows
(`fspo.serve.streaming`: only text that belongs to the final answer; the deltas concatenate to
`Answer.text`). `on_text` runs in the generating thread while the model is held, so it must not
block; an exception it raises stops the generation and propagates (e.g. the client went away).

Several answers (`LocalAnswerer.choose`, never streamed): n samples, or the n best of N samples by
the model's implicit reward against its training reference (`fspo.serve.references`), ranked as
``fspo generate --best-of N`` ranks them (`fspo.infer.best_of.best_of_n`). How every token is chosen
is the request's `Decoding`, sample j drawn from its seed for (`AnswerRequest.key`, j) as offline.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from fspo.core.errors import UserError
from fspo.data.schema import Preference
from fspo.data.template import DescriptionMode, TemplateOptions, parse_generation
from fspo.infer.generate import (
    Decoding,
    Mode,
    answer_finished,
    generate_batch,
    prefill,
    prompt_ids_for,
    template_options,
)
from fspo.infer.shots import shots_prefix_ids
from fspo.serve.cache import PrefixCache
from fspo.serve.references import ServedReference, model_id_of
from fspo.serve.streaming import AnswerStream, TextSink, token_streamer

FinishReason = Literal["stop", "length"]

DEFAULT_MAX_NEW_TOKENS_LIMIT = 512
# Prefixes shorter than this are not worth a cache entry (the copy costs about what the prefill does).
MIN_PREFIX_TOKENS = 32
# What ends a plain or oracle answer (`answer_finished`: a later line starts with '#'), as a stop string.
HEADING_STOP = "\n#"


@dataclass(frozen=True)
class AnswerRequest:
    shots: Sequence[Preference]
    question: str
    mode: Mode = Mode.PLAIN
    description: str | None = None  # oracle mode only: the user's true description
    max_new_tokens: int = 128
    decoding: Decoding = Decoding()  # greedy
    # Names the question in the sampling seeds (`Decoding.row_seed(key, j)`); offline, the episode id.
    key: str = ""
    cache_owner: str | None = None  # the user whose shots these are (`Answerer.forget` drops them)


@dataclass(frozen=True)
class Answer:
    text: str
    description: str | None  # RAT's inferred description, else None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose keys/values came from the prefix cache
    finish_reason: FinishReason


@dataclass(frozen=True)
class Choices:
    """The answers of one request for several, and what all its samples cost (OpenAI's `usage`
    counts every sample generated, kept or not)."""

    answers: list[Answer]  # best_of: best first; else in sample order
    rewards: list[float] | None  # best_of: each answer's implicit reward; None for unranked samples
    reference: str | None  # best_of: what the reward subtracts (a run's name, or "self")
    prompt_tokens: int
    completion_tokens: int  # every sample's generated tokens
    cached_tokens: int
    scored_tokens: int  # tokens the reward's scoring passes read (prompts and answers, both models)


class Answerer(Protocol):
    model_id: str
    max_new_tokens_limit: int
    max_samples: int | None  # the most samples `choose` takes (None: only the server's limit)
    default_mode: Mode

    def answer(self, req: AnswerRequest, on_text: TextSink | None = None) -> Answer: ...

    def choose(self, req: AnswerRequest, n: int, best_of: int = 1) -> Choices: ...

    def forget(self, user_id: str) -> None: ...

    def count_tokens(self, text: str) -> int: ...


@dataclass(frozen=True)
class System:
    """A served system (the study's FSPO model and its baselines): an answerer, how it is prompted,
    and at most how many of the user's newest preferences become its shots (0: none)."""

    name: str
    answerer: Answerer
    mode: Mode | None = None  # None: the answerer's default (RAT for a RAT-trained model)
    shots: int | None = 8

    @property
    def served_mode(self) -> Mode:
        return self.mode if self.mode is not None else self.answerer.default_mode


def _max_positions(config: Any) -> int | None:
    """The model's context length, when its config states one."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_request(req: AnswerRequest, limit: int) -> Mode:
    if not isinstance(req.question, str) or not req.question.strip():
        raise UserError("question: must be non-empty text")
    if not 1 <= req.max_new_tokens <= limit:
        raise UserError(f"max_new_tokens: must be between 1 and {limit} (got {req.max_new_tokens})")
    try:
        return Mode(req.mode)
    except ValueError:
        raise UserError(f"mode: {req.mode!r} is not one of {', '.join(m.value for m in Mode)}") from None


def samples_problem(n: int, best_of: int, decoding: Decoding, mode: Mode) -> tuple[str, str] | None:
    """(the field, why) when a request for `n` answers of `best_of` samples (1: unranked) cannot be
    answered; None when it can. Several samples must differ (temperature > 0) and be plain or oracle
    answers: RAT writes a description before each answer, and best-of-N does not score descriptions."""
    for field, value in (("n", n), ("best_of", best_of)):
        if value < 1:
            return field, f"must be at least 1, got {value}"
    field, value = ("best_of", best_of) if best_of > 1 else ("n", n)
    if best_of > 1 and n > best_of:
        return "best_of", f"must be at least n ({n}), got {best_of}"
    if value > 1 and not decoding.sampled:
        return field, f"{value} samples need temperature > 0 (greedy decoding gives one answer)"
    if value > 1 and mode is Mode.RAT:
        return field, f"{value} samples are plain or oracle answers, not rat (ask mode plain)"
    return None


class _Prompting:
    """What both answerers share: the layout, the prompt ids, the limits, and the answer's cut."""

    def __init__(
        self,
        tokenizer: Any,
        layout: TemplateOptions,
        *,
        model_id: str,
        max_positions: int | None,
        max_new_tokens_limit: int,
    ):
        self.tokenizer = tokenizer
        self.layout = layout
        self.model_id = model_id
        self.max_positions = max_positions
        cap = max_new_tokens_limit if max_positions is None else min(max_new_tokens_limit, max_positions - 1)
        self.max_new_tokens_limit = max(1, cap)
        self.default_mode = Mode.RAT if layout.description is DescriptionMode.TARGET else Mode.PLAIN

    def count_tokens(self, text: str) -> int:
        """`text`'s length in the model's tokens (what `usage` counts of an answer cut short)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt(self, req: AnswerRequest, mode: Mode) -> tuple[list[int], int]:
        """The prompt ids and the generation budget (max_new_tokens, capped by the context left)."""
        ids = prompt_ids_for(req.shots, req.question, self.tokenizer, mode, self.layout, req.description)
        budget = req.max_new_tokens
        if self.max_positions is not None:
            if len(ids) >= self.max_positions:
                raise UserError(
                    f"the prompt is {len(ids)} tokens ({len(req.shots)} shots and the question), more than "
                    f"the model's context of {self.max_positions} tokens: use fewer or shorter shots"
                )
            budget = min(budget, self.max_positions - len(ids))
        return ids, budget

    def _answer(
        self,
        raw: str,
        mode: Mode,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        ran_out: bool,
        stream: AnswerStream,
    ) -> Answer:
        """The cut answer; `ran_out`: generation stopped at its token budget (not at eos)."""
        parsed = parse_generation(raw)
        stream.finish(parsed.answer)
        rat = mode is Mode.RAT
        length = ran_out and not answer_finished(raw, rat)
        return Answer(
            text=parsed.answer,
            description=parsed.description if rat else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            finish_reason="length" if length else "stop",
        )


class LocalAnswerer(_Prompting):
    """Generation in this process with a Hugging Face causal LM, plus the per-user prefix cache.

    One lock serializes use of the model (and tokenizer): requests from the server's threadpool
    generate one at a time, each as a batch of one (or of its samples), as `generate_batch` with no
    padding. `reference` is best-of-N's (default: the model itself, without shots).
    """

    max_samples: int | None = None  # only the server's limit

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        layout: TemplateOptions | None = None,
        cache: PrefixCache | None = None,
        max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
        min_prefix_tokens: int = MIN_PREFIX_TOKENS,
        reference: ServedReference | None = None,
    ):
        super().__init__(
            tokenizer,
            layout or TemplateOptions(),
            model_id=model_id,
            max_positions=_max_positions(model.config),
            max_new_tokens_limit=max_new_tokens_limit,
        )
        self.model = model.eval()
        self.cache = cache
        self.min_prefix_tokens = min_prefix_tokens
        self.reference = reference or ServedReference()
        if self.reference.folder is not None:  # checked now: a mismatch must stop the server starting
            from fspo.models.loading import require_same_tokenizer

            require_same_tokenizer(tokenizer, self.reference.folder, "best-of-N's reference", repr(model_id))
        self._lock = threading.Lock()

    def answer(self, req: AnswerRequest, on_text: TextSink | None = None) -> Answer:
        mode = _check_request(req, self.max_new_tokens_limit)
        stream = AnswerStream(on_text)
        with self._lock:
            ids, budget = self._prompt(req, mode)
            kv, cached = self._prefix_kv(req, mode, ids)
            new_ids = generate_batch(
                self.model,
                self.tokenizer,
                [ids],
                rat=mode is Mode.RAT,
                max_new_tokens=budget,
                decoding=req.decoding,
                seeds=[req.decoding.row_seed(req.key)],
                cache=kv,
                streamer=token_streamer(self.tokenizer, stream) if on_text is not None else None,
            )[0]
            return self._generated(new_ids, mode, len(ids), budget, cached, stream)

    def choose(self, req: AnswerRequest, n: int, best_of: int = 1) -> Choices:
        """`n` answers to `req`'s question: with `best_of` > 1, the `n` of `best_of` samples with the
        highest implicit reward against `reference`, best first, as ``fspo generate --best-of``
        ranks them; else `n` samples in order. Sample j is drawn from the seed of (`req.key`, j), so
        best-of-N's samples are those of n = N and sample 0 is `answer`'s. All extend one copy of the
        user's cached prefix, and best_of_n shares the scoring pass over the prompt."""
        mode = _check_request(req, self.max_new_tokens_limit)
        problem = samples_problem(n, best_of, req.decoding, mode)
        if problem is not None:
            raise UserError(": ".join(problem))
        with self._lock:
            ids, budget = self._prompt(req, mode)
            kv, cached = self._prefix_kv(req, mode, ids)
            if best_of > 1:
                ranked = self._best_of(req, mode, best_of, budget, kv)
                new_ids, scored = ranked.new_ids, ranked.scored_tokens
                order = sorted(range(best_of), key=lambda j: -ranked.rewards[j])[:n]  # stable: ties in order
                rewards: list[float] | None = [ranked.rewards[j] for j in order]
            else:
                if kv is not None:
                    kv.batch_repeat_interleave(n)
                new_ids = generate_batch(
                    self.model,
                    self.tokenizer,
                    [ids] * n,
                    rat=mode is Mode.RAT,
                    max_new_tokens=budget,
                    decoding=req.decoding,
                    seeds=[req.decoding.row_seed(req.key, j) for j in range(n)],
                    cache=kv,
                )
                order, rewards, scored = list(range(n)), None, 0
            silent = AnswerStream(None)
            answers = [self._generated(new_ids[j], mode, len(ids), budget, cached, silent) for j in order]
        return Choices(
            answers=answers,
            rewards=rewards,
            reference=self.reference.name if rewards is not None else None,
            prompt_tokens=len(ids),
            completion_tokens=sum(map(len, new_ids)),
            cached_tokens=cached,
            scored_tokens=scored,
        )

    def _best_of(self, req: AnswerRequest, mode: Mode, n: int, budget: int, kv: Any) -> Any:
        """`fspo.infer.best_of.best_of_n` of `req` (a `BestOf`), from the prefix cache `kv` if any."""
        from fspo.infer.best_of import best_of_n

        return best_of_n(
            self.model,
            self.tokenizer,
            req.shots,
            req.question,
            n=n,
            decoding=req.decoding,
            key=req.key,
            reference=self.reference.reference(self.model.device),
            max_new_tokens=budget,
            mode=mode,
            options=self.layout,
            description=req.description,
            cache=kv,
        )

    def _generated(
        self,
        new_ids: list[int],
        mode: Mode,
        prompt_tokens: int,
        budget: int,
        cached: int,
        stream: AnswerStream,
    ) -> Answer:
        """The `Answer` of one row's generated ids (decoded here, under the lock: the tokenizer is shared)."""
        eos = self.tokenizer.eos_token_id
        return self._answer(
            self.tokenizer.decode(new_ids, skip_special_tokens=True),
            mode,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_ids),
            cached_tokens=cached,
            ran_out=(eos is None or eos not in new_ids) and len(new_ids) >= budget,
            stream=stream,
        )

    def forget(self, user_id: str) -> None:
        if self.cache is not None:
            self.cache.forget(user_id)

    def prefix_ids(self, req: AnswerRequest, mode: Mode) -> list[int]:
        """The prompt tokens every question of these shots shares (same mode, layout, description):
        where the shots end, as training cuts them (`fspo.infer.shots`)."""
        return shots_prefix_ids(req.shots, req.question, self.tokenizer, mode, self.layout, req.description)

    def _prefix_kv(self, req: AnswerRequest, mode: Mode, ids: list[int]) -> tuple[Any, int]:
        """A KV cache of the shared prefix of `ids` for `generate` to extend, and how many of its
        tokens came from the prefix cache (0 on a miss, which prefills the prefix and stores it).
        None when the request is not cached: no cache, no shots, a short prefix, or a question
        whose tokens merge with the prefix's last ones."""
        if self.cache is None or not req.shots:
            return None, 0
        prefix = self.prefix_ids(req, mode)
        if len(prefix) < self.min_prefix_tokens or len(prefix) >= len(ids) or ids[: len(prefix)] != prefix:
            return None, 0
        options = template_options(mode, self.layout).model_dump_json()
        key = (self.model_id, f"{mode.value}:{options}", tuple(prefix))
        kv = self.cache.get(key)
        if kv is not None:
            return kv, len(prefix)
        stored = prefill(self.model, prefix)
        if self.cache.put(key, stored, owner=req.cache_owner):
            return copy.deepcopy(stored), 0  # `generate` extends what it gets; the entry stays the prefix
        return stored, 0  # not kept (larger than the whole cache): nothing else will read it


class RemoteAnswerer(_Prompting):
    """Generation on an OpenAI-compatible completions server (vLLM, SGLang) from our prompt ids.

    The tokenizer, layout and context length come from the local model folder, so the prompt is
    the one `LocalAnswerer` builds, sent as a list of token ids (the server does not re-tokenize
    it). Requests run concurrently (the server batches them).

    The response is streamed. A plain or oracle answer ends at the first line starting with '#'
    (the next example, or the dispreferred heading), so the request says ``stop=["\\n#"]``: the
    server ends the generation there itself and then sends the usage chunk asked for with
    ``stream_options.include_usage``, whose ``prompt_tokens_details.cached_tokens`` are its
    prefix-cache hits (vLLM fills it when started with ``--enable-prompt-tokens-details``). A RAT
    answer follows headings the model writes itself (description, response), so no stop string can
    mark its end: the stream is closed as soon as the answer is finished, so that the server stops
    generating the next example, and the usage chunk never comes: cached tokens are then unknown and
    reported as 0, and the completion tokens are counted here.

    One answer a request: best-of-N scores with the model's own log-probabilities, which are here only
    in the remote server. The repetition controls are refused: vLLM's penalty also counts the prompt's
    tokens and it has no n-gram rule, so its answers would not be `fspo generate`'s.
    """

    max_samples: int | None = 1

    def __init__(
        self,
        client: Any,
        tokenizer: Any,
        *,
        remote_model: str,
        model_id: str,
        layout: TemplateOptions | None = None,
        max_positions: int | None = None,
        max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
    ):
        super().__init__(
            tokenizer,
            layout or TemplateOptions(),
            model_id=model_id,
            max_positions=max_positions,
            max_new_tokens_limit=max_new_tokens_limit,
        )
        self.client = client
        self.remote_model = remote_model
        self._lock = threading.Lock()  # a fast tokenizer is not safe to share between threads

    def answer(self, req: AnswerRequest, on_text: TextSink | None = None) -> Answer:
        mode = _check_request(req, self.max_new_tokens_limit)
        decoding = req.decoding
        if decoding.repetition_penalty != 1.0 or decoding.no_repeat_ngram_size:
            raise UserError(f"decoding: {decoding.describe()} is not available with a remote backend")
        rat = mode is Mode.RAT
        with self._lock:
            ids, budget = self._prompt(req, mode)
        stream = AnswerStream(on_text)
        raw, finish, usage = "", None, None
        response = self.client.completions.create(
            model=self.remote_model,
            prompt=ids,
            max_tokens=budget,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            seed=decoding.seed,
            stream=True,
            stream_options={"include_usage": True},
            **({} if rat else {"stop": [HEADING_STOP]}),
        )
        try:
            for chunk in response:
                usage = getattr(chunk, "usage", None) or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                raw += choice.text or ""
                finish = choice.finish_reason or finish
                stream.update(raw)
                # RAT; or an answer that starts with '#' (the stop string needs the newline before
                # it); or a server that ignores `stop`.
                if answer_finished(raw, rat):
                    break
        finally:
            response.close()  # the server stops generating once the connection is gone
        if usage is not None and getattr(usage, "completion_tokens", None) is not None:
            completion_tokens = usage.completion_tokens
        else:  # closed before the usage chunk: count the text we read
            with self._lock:
                completion_tokens = len(self.tokenizer(raw, add_special_tokens=False)["input_ids"])
        details = getattr(usage, "prompt_tokens_details", None)
        return self._answer(
            raw,
            mode,
            prompt_tokens=len(ids),
            completion_tokens=completion_tokens,
            cached_tokens=int(getattr(details, "cached_tokens", 0) or 0),
            ran_out=finish == "length",
            stream=stream,
        )

    def choose(self, req: AnswerRequest, n: int, best_of: int = 1) -> Choices:
        raise UserError(f"n, best_of: one answer a request with a remote backend (asked {max(n, best_of)})")

    def forget(self, user_id: str) -> None:
        """Nothing to drop here: the remote server's prefix cache is keyed on the tokens themselves."""


def local_answerer(
    model_dir: str | Path,
    *,
    model_id: str | None = None,
    cache_bytes: int = 256 << 20,
    device: str | None = None,
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
    reference: ServedReference | None = None,
) -> LocalAnswerer:
    """Load `model_dir` for in-process serving with the layout it was trained with.

    `cache_bytes` bounds the prefix cache (0: no cache); `device` defaults to CUDA when available;
    `reference` is best-of-N's (default: the training reference its folder records, `ServedReference.of`).
    """
    import torch

    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer

    layout = trained_layout(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return LocalAnswerer(
        model,
        tokenizer,
        model_id=model_id or model_id_of(model_dir),
        layout=layout,
        cache=PrefixCache(cache_bytes) if cache_bytes > 0 else None,
        max_new_tokens_limit=max_new_tokens_limit,
        reference=reference or ServedReference.of(model_dir),
    )


def remote_answerer(
    url: str,
    model_dir: str | Path,
    *,
    remote_model: str,
    model_id: str | None = None,
    api_key: str | None = None,
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
) -> RemoteAnswerer:
    """Serve through an OpenAI-compatible server at `url` (its base URL, e.g. ``http://host:8000/v1``)
    that serves `model_dir`'s weights as `remote_model`; the folder gives tokenizer, layout and context."""
    import openai
    from transformers import AutoConfig

    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_tokenizer

    layout = trained_layout(model_dir)
    tokenizer = load_tokenizer(model_dir)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise UserError(f"model folder {str(model_dir)!r} has no readable config.json ({err})") from None
    # A person waits on each request: one retry, and a timeout that fails (502) rather than hangs.
    client = openai.OpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=1, timeout=120.0)
    return RemoteAnswerer(
        client,
        tokenizer,
        remote_model=remote_model,
        model_id=model_id or model_id_of(model_dir),
        layout=layout,
        max_positions=_max_positions(config),
        max_new_tokens_limit=max_new_tokens_limit,
    )
