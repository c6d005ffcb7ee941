"""Judges: who decides which of two answers a user prefers.

Every judge has one method, ``prefer(user, question, a, b) -> float``: the probability that answer
`a` wins for `user` (0.5 is a tie). Win rates, reports and the CLI only ever see that interface,
so a simulated user's exact reward and an LLM judge are interchangeable.

* `ExactRewardJudge` - the simulated user's own reward (`fspo.sim.reward_for`). Exact, free and
  deterministic: the primary judge of this project, since LLM judges are unreliable on
  personalization (see /work/shared/PAPER_NOTES.md).
* `OpenAIJudge` - any OpenAI-compatible endpoint with an AlpacaEval-style pairwise prompt extended
  with the user's description. Each pair is asked in BOTH orders and a verdict that flips with the
  order counts as a tie, which cancels position bias instead of averaging it in.
* `LocalJudge` - a transformers model; compares next-token probabilities of "A" and "B".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template
from typing import Any, Protocol, runtime_checkable

from fspo.core.errors import UserError
from fspo.core.files import AppendLog
from fspo.data.schema import User

PROMPTS = Path(__file__).parent / "prompts"
NO_DESCRIPTION = "(no description of this user is available)"
RewardFn = Callable[[str, str], float]


@runtime_checkable
class Judge(Protocol):
    """The one judge interface: the probability that `a` beats `b` for `user` (0.5 = tie)."""

    name: str

    def prefer(self, user: User, question: str, a: str, b: str) -> float: ...


def prefer_many(judge: Judge, items: Sequence[tuple[User, str, str, str]], workers: int = 1) -> list[float]:
    """`judge.prefer` over many (user, question, a, b) items; judges with I/O may run them in threads."""
    batch = getattr(judge, "prefer_many", None)
    if batch is not None:
        return list(batch(items, workers=workers))
    return [judge.prefer(*item) for item in items]


# --------------------------------------------------------------------------------------------- exact
def _sim_reward_for(user: User) -> RewardFn:
    try:
        from fspo.sim import reward_for
    except ImportError as err:  # the simulator is a separate stage; say what is missing
        raise UserError("the 'exact' judge needs fspo.sim.reward_for (simulated users)") from err
    return reward_for(user)


class ExactRewardJudge:
    """The simulated user's exact reward decides: higher reward wins, equal rewards tie.

    Rewards closer than `tie_margin` count as ties so that float noise never decides a pair.
    `reward_for` is injectable (tests, other simulators); by default it is `fspo.sim.reward_for`,
    which rebuilds the user's reward from `User.metadata`.
    """

    name = "exact"

    def __init__(self, reward_for: Callable[[User], RewardFn] | None = None, tie_margin: float = 1e-9):
        self._reward_for = reward_for or _sim_reward_for
        self._cache: dict[str, RewardFn] = {}
        self.tie_margin = tie_margin

    def reward(self, user: User) -> RewardFn:
        if user.user_id not in self._cache:
            try:
                self._cache[user.user_id] = self._reward_for(user)
            except (KeyError, ValueError, TypeError) as err:
                raise UserError(
                    f"user {user.user_id!r}: cannot rebuild its exact reward from metadata ({err}); "
                    "the exact judge only works for simulated users"
                ) from err
        return self._cache[user.user_id]

    def prefer(self, user: User, question: str, a: str, b: str) -> float:
        fn = self.reward(user)
        diff = fn(question, a) - fn(question, b)
        if abs(diff) <= self.tie_margin:
            return 0.5
        return 1.0 if diff > 0 else 0.0


# ------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PairwisePrompt:
    """The judge prompt (system + user message), read from `fspo/eval/prompts/` template files."""

    system: str
    user: Template

    @classmethod
    def load(cls, folder: str | Path = PROMPTS, name: str = "pairwise") -> PairwisePrompt:
        folder = Path(folder)
        try:
            system = (folder / f"{name}_system.txt").read_text(encoding="utf-8").strip()
            user = (folder / f"{name}_user.txt").read_text(encoding="utf-8").strip()
        except FileNotFoundError as err:
            raise UserError(f"judge prompt template not found: {err.filename}") from err
        return cls(system, Template(user))

    def render(self, user: User, question: str, first: str, second: str) -> str:
        return self.user.substitute(
            description=(user.description or "").strip() or NO_DESCRIPTION,
            question=question.strip(),
            output_a=first.strip(),
            output_b=second.strip(),
        )


_VERDICT = re.compile(r"^[\s\"'*(\[]*(?:(?:response|output|answer)\s*)?\(?([AB])\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """'A' or 'B' from a judge's reply, or None when the reply is malformed (then we re-ask)."""
    if not text:
        return None
    match = _VERDICT.match(text.strip())
    return match.group(1).upper() if match else None


def _combine(first: str | None, second: str | None) -> tuple[float, bool]:
    """Score of answer a from (verdict with a shown first, verdict with a shown second).

    Agreeing verdicts decide; a flip with the order, or a missing verdict, is a tie (0.5).
    Returns (score, flipped).
    """
    s1 = {"A": 1.0, "B": 0.0}.get(first or "", 0.5)
    s2 = {"B": 1.0, "A": 0.0}.get(second or "", 0.5)
    if s1 == s2:
        return s1, False
    return 0.5, first is not None and second is not None


# ------------------------------------------------------------------------------------------ openai
@dataclass
class JudgeUsage:
    """What a judge run cost: requests, cache hits, tokens, malformed replies, order flips."""

    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    malformed: int = 0
    unresolved: int = 0
    pairs: int = 0
    flips: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class OpenAIJudge:
    """Pairwise LLM judge over any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, ...).

    Transport retries (429, 5xx, timeouts, connection errors, with exponential backoff that honours
    Retry-After) are the `openai` client's own (`max_retries`). Malformed replies are re-asked up to
    `max_parse_retries` times; still malformed, that order counts as a tie. Verdicts are cached in
    an append-only JSONL file keyed by a hash of (model, system prompt, prompt, temperature), so a
    re-run costs no requests. Prices are per million tokens and only feed the cost counter.
    """

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        cache_path: str | Path | None = None,
        *,
        max_retries: int = 5,
        max_parse_retries: int = 2,
        timeout: float = 60.0,
        temperature: float = 0.0,
        max_tokens: int = 8,
        price_prompt_per_mtok: float = 0.0,
        price_completion_per_mtok: float = 0.0,
        prompt: PairwisePrompt | None = None,
        client: Any = None,
    ):
        import openai

        self.model = model or os.environ.get("FSPO_JUDGE_MODEL")
        if not self.model:
            raise UserError("the openai judge needs a model name (--judge-model or FSPO_JUDGE_MODEL)")
        base_url = base_url or os.environ.get("FSPO_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        api_key = api_key or os.environ.get("FSPO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            if not base_url:
                raise UserError("the openai judge needs an API key: set FSPO_JUDGE_API_KEY or OPENAI_API_KEY")
            api_key = "not-needed"  # local servers (vLLM, llama.cpp) accept any key
        self.base_url = base_url
        self.client = client or openai.OpenAI(
            base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout
        )
        self.max_parse_retries = max_parse_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.prices = (price_prompt_per_mtok, price_completion_per_mtok)
        self.prompt = prompt or PairwisePrompt.load()
        self.usage = JudgeUsage()
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}
        self._log: AppendLog | None = None
        if cache_path is not None:
            self._log = AppendLog(cache_path)
            for row in self._log.read():
                if row.get("verdict") in ("A", "B"):
                    self._cache[row["key"]] = row["verdict"]

    def _key(self, text: str) -> str:
        blob = json.dumps([self.model, self.prompt.system, text, self.temperature], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _request(self, text: str) -> str:
        import openai

        try:
            resp = self.client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": self.prompt.system},
                    {"role": "user", "content": text},
                ],
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
        except openai.APIError as err:
            raise UserError(
                f"judge endpoint {self.base_url or 'api.openai.com'} (model {self.model}): {err}"
            ) from err
        with self._lock:
            self.usage.requests += 1
            if resp.usage is not None:
                self.usage.prompt_tokens += resp.usage.prompt_tokens or 0
                self.usage.completion_tokens += resp.usage.completion_tokens or 0
                self.usage.cost_usd = (
                    self.usage.prompt_tokens * self.prices[0] + self.usage.completion_tokens * self.prices[1]
                ) / 1e6
        return (resp.choices[0].message.content or "") if resp.choices else ""

    def ask(self, text: str) -> str | None:
        """One verdict ('A', 'B', or None if every attempt was malformed) for a rendered prompt."""
        key = self._key(text)
        with self._lock:
            if key in self._cache:
                self.usage.cache_hits += 1
                return self._cache[key]
        for _ in range(1 + self.max_parse_retries):
            reply = self._request(text)
            verdict = parse_verdict(reply)
            if verdict is not None:
                with self._lock:
                    self._cache[key] = verdict
                    if self._log is not None:
                        self._log.append(
                            {"key": key, "model": self.model, "verdict": verdict, "reply": reply}
                        )
                return verdict
            with self._lock:
                self.usage.malformed += 1
        with self._lock:
            self.usage.unresolved += 1
        return None

    def prefer(self, user: User, question: str, a: str, b: str) -> float:
        if a.strip() == b.strip():
            return 0.5  # identical answers: nothing to judge, no request
        first = self.ask(self.prompt.render(user, question, a, b))
        second = self.ask(self.prompt.render(user, question, b, a))
        score, flipped = _combine(first, second)
        with self._lock:
            self.usage.pairs += 1
            self.usage.flips += int(flipped)
        return score

    def prefer_many(self, items: Sequence[tuple[User, str, str, str]], workers: int = 4) -> list[float]:
        if workers <= 1:
            return [self.prefer(*item) for item in items]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda item: self.prefer(*item), items))

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


# ------------------------------------------------------------------------------------------- local
class LocalJudge:
    """A local causal LM as judge: P(A) vs P(B) as the next token after the judge prompt.

    Both orders are scored and averaged (P(a wins) = (P_A(a first) + P_B(a second)) / 2), which
    cancels the model's position bias in expectation. Uses the tokenizer's chat template when it has
    one; otherwise the raw prompt followed by "Answer:". Several spellings of each letter ("A", " A")
    are summed, since which one a tokenizer uses after the prompt varies.
    """

    name = "local"

    def __init__(self, model: Any, tokenizer: Any, prompt: PairwisePrompt | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt = prompt or PairwisePrompt.load()
        self._ids = {letter: self._letter_ids(letter) for letter in "AB"}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LocalJudge:
        from fspo.models.loading import load_model, load_tokenizer

        return cls(load_model(path), load_tokenizer(path))

    def _letter_ids(self, letter: str) -> list[int]:
        ids = set()
        for text in (letter, " " + letter):
            toks = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if toks:
                ids.add(toks[0])
        return sorted(ids)

    def _text(self, body: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.prompt.system}, {"role": "user", "content": body}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.prompt.system}\n\n{body}\nAnswer:"

    def prob_first(self, text: str) -> float:
        import torch

        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)
        pa = float(probs[self._ids["A"]].sum())
        pb = float(probs[self._ids["B"]].sum())
        return 0.5 if pa + pb == 0 else pa / (pa + pb)

    def prefer(self, user: User, question: str, a: str, b: str) -> float:
        if a.strip() == b.strip():
            return 0.5
        p1 = self.prob_first(self._text(self.prompt.render(user, question, a, b)))
        p2 = self.prob_first(self._text(self.prompt.render(user, question, b, a)))
        return (p1 + (1.0 - p2)) / 2


# ----------------------------------------------------------------------------------------- factory
JUDGES = ("exact", "openai", "local")


def make_judge(name: str, **options: Any) -> Judge:
    """Build a judge by name: 'exact', 'openai' (options: model, base_url, api_key, cache_path, ...)
    or 'local' (option: model_path). Unknown names are a `UserError` listing the known ones."""
    if name == "exact":
        return ExactRewardJudge(**options)
    if name == "openai":
        return OpenAIJudge(**options)
    if name == "local":
        path = options.pop("model_path", None)
        if not path:
            raise UserError("the local judge needs a model folder (--judge-model)")
        return LocalJudge.from_pretrained(path)
    raise UserError(f"unknown judge {name!r}; known judges: {', '.join(JUDGES)}")
