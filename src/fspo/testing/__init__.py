"""What the tests and benchmarks build on, public so that a user's own checks can build on it too.

Nothing in the rest of `fspo` imports this module (tests/test_layering.py puts it above every other
layer). It holds these things, each small and each needed by tests and by `benchmarks/`:

- a toy preference world whose answer is known (`toy_users`, `toy_episodes`, `toy_preferences`,
  `toy_corpus`, `toy_reward_for`): each user prefers the answer naming their favourite colour;
- tiny randomly initialised models of real architectures (`tiny_llama`, `tiny_gpt2`, `tiny_lm`);
- `serve_in_thread`: an ASGI app served by uvicorn on 127.0.0.1 in a thread; `serve_processes`: real
  `fspo serve` processes on 127.0.0.1;
- `serve_openai`: a scripted OpenAI-compatible server (chat and text completions, as vLLM serves
  them), to try code built on `fspo.llm` or an OpenAI client (retries, re-asks, caching,
  concurrency, throughput) offline, without a real endpoint;
- `postgres_cluster` (`fspo.testing.postgres`): a throwaway PostgreSQL server (the store's tests and the
  load benchmark run on it).

torch and transformers are imported inside the tiny-model functions: the rest of the module is
used by processes that never build a model (the stub server, `benchmarks/synth_throughput.py`),
and importing transformers' model classes takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fspo.data.schema import Episode, Preference, User
from fspo.testing.logs import tail

# Re-exported: `from fspo.testing import postgres_cluster` as for every other helper.
from fspo.testing.postgres import PostgresCluster as PostgresCluster
from fspo.testing.postgres import postgres_cluster as postgres_cluster
from fspo.testing.postgres import postgres_missing as postgres_missing

if TYPE_CHECKING:
    from transformers import (
        GPT2LMHeadModel,
        LlamaForCausalLM,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

# --------------------------------------------------------------------------------------- toy world
# The toy world. Only the shots tell a model which colour a user likes, so ranking a new pair of
# this user is the smallest task on which few-shot preference learning has something to learn, and
# `toy_reward_for` judges any text exactly.

COLOURS = ("red", "blue", "green", "yellow")
THINGS = ("coat", "hat", "car", "wall", "cup", "bike", "door", "lamp")


def toy_users(n: int = 8, prefix: str = "u") -> list[User]:
    """`n` users, ids `{prefix}0`, `{prefix}1`, ...; user i's favourite colour (`metadata["fav"]`) is
    COLOURS[i % 4]."""
    return [
        User(
            user_id=f"{prefix}{i}",
            description=f"This user loves the colour {COLOURS[i % len(COLOURS)]}.",
            metadata={"fav": COLOURS[i % len(COLOURS)]},
        )
        for i in range(n)
    ]


def _preference(rng: random.Random, user: User, thing: str, question: str, words: str = "") -> Preference:
    """`user` prefers the answer naming their colour over one naming another colour drawn from `rng`."""
    fav = user.metadata["fav"]
    other = rng.choice([c for c in COLOURS if c != fav])
    return Preference(
        user_id=user.user_id,
        question=question,
        chosen=f"Get the{words} {fav} {thing}.",
        rejected=f"Get the{words} {other} {thing}.",
    )


def toy_episodes(users: Sequence[User], per_user: int = 6, shots: int = 2, seed: int = 0) -> list[Episode]:
    """`per_user` episodes a user, each a shuffle of the same `shots + 1` preferences, in random order.

    Every episode of a user draws its shots and query from one small set of questions, so a model sees
    the same question as a shot in one episode and as the query in another.
    """
    rng = random.Random(seed)
    episodes = []
    for u, user in enumerate(users):
        things = [THINGS[(u + i) % len(THINGS)] for i in range(shots + 1)]
        prefs = [_preference(rng, user, t, f"Which {t} should I get?") for t in things]
        for j in range(per_user):
            rng.shuffle(prefs)
            episodes.append(
                Episode(
                    episode_id=f"{user.user_id}-{j}",
                    user_id=user.user_id,
                    shots=prefs[:shots],
                    query=prefs[shots],
                    description=user.description,
                )
            )
    rng.shuffle(episodes)
    return episodes


def toy_preferences(users: Sequence[User], per_user: int = 12, seed: int = 0) -> list[Preference]:
    """`per_user` preferences a user, each on its own question: input for `fspo.data.episodes.build_episodes`.

    Answers come in four lengths, so length bucketing has something to sort.
    """
    rng = random.Random(seed)
    prefs = []
    for u, user in enumerate(users):
        for i in range(per_user):
            thing = THINGS[(u + i) % len(THINGS)]
            question = f"Which {thing} should I get for room {i}?"
            prefs.append(_preference(rng, user, thing, question, words=" very" * (i % 4)))
    return prefs


def toy_corpus(episodes: Sequence[Episode]) -> list[str]:
    """One short document per preference in the episodes: text to train a tokenizer and tiny model on."""
    return [
        f"## Question \n{p.question}\n## Response \n{p.chosen}\n{p.rejected}\n"
        for e in episodes
        for p in [*e.shots, e.query]
    ]


def toy_reward_for(user: User) -> Callable[[str, str], float]:
    """A `reward_for` in the shape of `fspo.sim`'s: +1 for each word of the text that is the favourite."""
    fav = user.metadata["fav"]
    return lambda question, text: float(text.split().count(fav))


# ------------------------------------------------------------------------------------- tiny models
# Tiny models. A forward pass takes milliseconds on a CPU, yet they are the Hugging Face classes real
# checkpoints load into, so what depends on the architecture (attention masks, position ids, KV
# caches, padding) runs as it will on a real model. Same arguments, same weights: each build seeds
# torch first.


def _vocab_fields(vocab: int | PreTrainedTokenizerBase) -> dict[str, Any]:
    """A vocabulary size, or a tokenizer's size and special token ids (so generation stops and pads)."""
    if isinstance(vocab, int):
        return {"vocab_size": vocab}
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": vocab.eos_token_id,
        "pad_token_id": vocab.pad_token_id,
    }


def _seeded(seed: int | None) -> None:
    import torch

    if seed is not None:
        torch.manual_seed(seed)


def tiny_llama(
    vocab: int | PreTrainedTokenizerBase, seed: int | None = 0, attn: str = "sdpa", **config: Any
) -> LlamaForCausalLM:
    """A 2-layer `LlamaForCausalLM`, width 32, 4 query and 2 key-value heads; `config` overrides
    any `LlamaConfig` field. `seed=None` draws the weights from torch's current random state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    fields |= dict(num_attention_heads=4, num_key_value_heads=2)
    cfg = LlamaConfig(**{**fields, **_vocab_fields(vocab), **config})
    _seeded(seed)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn)


def tiny_gpt2(
    vocab: int | PreTrainedTokenizerBase, seed: int | None = 0, attn: str = "sdpa", **config: Any
) -> GPT2LMHeadModel:
    """A 2-layer `GPT2LMHeadModel`, width 32, 2 heads, 512 positions; `config` overrides any
    `GPT2Config` field. `seed=None` draws the weights from torch's current random state."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(n_embd=32, n_layer=2, n_head=2, n_positions=512)
    cfg = GPT2Config(**{**fields, **_vocab_fields(vocab), **config})
    _seeded(seed)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)


def tiny_lm(texts: Sequence[str], seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A byte-level BPE tokenizer (400 tokens) trained on `texts` and a `tiny_llama` on it, in eval mode."""
    from fspo.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = tiny_llama(tokenizer, seed=seed, max_position_embeddings=1024)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------- loopback server
# The loopback server. Tests of the server, the scripted OpenAI stub and the load benchmark need a
# real HTTP server they can start and stop in-process: this binds loopback only, picks a free port
# (port 0), waits until it accepts connections and always shuts it down.


@contextmanager
def serve_in_thread(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) in a daemon thread; yields its base URL ``http://127.0.0.1:PORT``."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="loopback-server")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the loopback server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now, for a server started next to bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_processes(
    args: Sequence[str], count: int = 1, *, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[list[str]]:
    """`count` processes of ``fspo serve ARGS`` (each on 127.0.0.1 and a free port), started together;
    yields their base URLs once each answers ``/healthz``, and stops them (Ctrl-C's SIGINT, then SIGKILL)
    on exit. Each process is a session of its own, so the signal reaches its --workers too; its output
    goes to a log file, whose tail a failure to start quotes."""
    cmd = [sys.executable, "-c", "from fspo.cli import main; main()", "serve", *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="fspo-serve-") as logs, ExitStack() as stack:
        started: list[tuple[subprocess.Popen, Path, str]] = []
        for i in range(count):
            port, log = free_port(), Path(logs) / f"server{i}.log"
            out = stack.enter_context(open(log, "w"))
            proc = subprocess.Popen(
                [*cmd, "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            stack.callback(_stop_session, proc)
            started.append((proc, log, f"http://127.0.0.1:{port}"))
        deadline = time.monotonic() + timeout
        for proc, log, url in started:
            _wait_healthy(proc, log, url, deadline)
        yield [url for _, _, url in started]


def _wait_healthy(proc: subprocess.Popen, log: Path, url: str, deadline: float) -> None:
    import httpx

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"fspo serve exited with status {proc.returncode}: {tail(log)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"fspo serve did not answer at {url} in time: {tail(log)}")
        time.sleep(0.1)


def _stop_session(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGINT to the process's session (a server and its workers), SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -------------------------------------------------------------------------- scripted OpenAI server
# The scripted OpenAI server: `serve_openai` says how to script it.


@dataclass
class Reply:
    """A scripted reply: the assistant text, or a failure (`status`, `headers`), a raw `body`, slowness."""

    content: str | None = None
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens); default: word counts
    finish_reason: str = "stop"  # of a text completion
    chunk_delay: float = 0.0  # seconds between the chunks of a streamed text completion
    cached_tokens: int | None = None  # reported as usage.prompt_tokens_details.cached_tokens


Responder = Callable[[dict[str, Any]], "str | dict[str, Any] | Reply"]


def user_text(request: dict[str, Any]) -> str:
    """The content of the last user message of a chat request (what most responders look at)."""
    return next(m["content"] for m in reversed(request["messages"]) if m["role"] == "user")


def usage_body(usage: tuple[int, int], cached_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage[0],
        "completion_tokens": usage[1],
        "total_tokens": sum(usage),
    }
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def apply_stop(content: str, stop: Any) -> tuple[str, bool]:
    """`content` cut before the earliest of the request's `stop` strings (a string or a list), and
    whether it was cut."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    found = [i for i in (content.find(s) for s in stops if s) if i >= 0]
    return (content[: min(found)], True) if found else (content, False)


def chat_body(content: str, model: str, usage: tuple[int, int]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": usage_body(usage),
    }


def completion_body(
    content: str, model: str, usage: tuple[int, int], finish_reason: str, cached_tokens: int | None = None
) -> dict[str, Any]:
    return {
        "id": "cmpl-stub",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": content, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_body(usage, cached_tokens),
    }


def _prompt_size(prompt: Any) -> int:
    """Prompt tokens of a completions request: ids are counted, text is counted in words."""
    if isinstance(prompt, list):
        return len(prompt)
    return len(str(prompt).split())


class StubServer:
    def __init__(self, responder: Responder):
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.chunks_sent: list[int] = []  # per streamed completions request, in arrival order
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.post("/chat/completions")(self._chat)
        self.app.post("/v1/completions")(self._completions)
        self.app.post("/completions")(self._completions)

    async def _reply(self, body: dict[str, Any]) -> Reply | JSONResponse:
        """The responder's scripted reply to `body`, after its delay; a whole response when the script
        gives an error status or a raw body."""
        reply = self.responder(body)
        if not isinstance(reply, Reply):
            reply = Reply(body=reply) if isinstance(reply, dict) else Reply(content=reply)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            err = {"error": {"message": f"stub error {reply.status}", "code": reply.status}}
            return JSONResponse(reply.body or err, status_code=reply.status, headers=reply.headers)
        if reply.body is not None:
            return JSONResponse(reply.body, headers=reply.headers)
        return reply

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = await self._reply(body)
            if isinstance(reply, JSONResponse):
                return reply
            content, _ = apply_stop(reply.content or "", body.get("stop"))
            words_in = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
            usage = reply.usage or (words_in, len(content.split()))
            return JSONResponse(chat_body(content, body.get("model", "stub"), usage), headers=reply.headers)
        finally:
            self.in_flight -= 1

    async def _completions(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        reply = await self._reply(body)
        if isinstance(reply, JSONResponse):
            return reply
        content, stopped = apply_stop(reply.content or "", body.get("stop"))
        finish_reason = "stop" if stopped else reply.finish_reason
        usage = reply.usage or (_prompt_size(body.get("prompt")), len(content.split()))
        model = body.get("model", "stub")
        if not body.get("stream"):
            return JSONResponse(
                completion_body(content, model, usage, finish_reason, reply.cached_tokens),
                headers=reply.headers,
            )
        slot = len(self.chunks_sent)
        self.chunks_sent.append(0)
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> Any:
            def event(text: str | None, finish: str | None, last_usage: bool = False) -> str:
                chunk = completion_body(text or "", model, usage, "stop", reply.cached_tokens)
                chunk["choices"][0]["finish_reason"] = finish
                if text is None:  # the usage chunk: no choices
                    chunk["choices"] = []
                if not last_usage:
                    chunk["usage"] = None
                return f"data: {json.dumps(chunk)}\n\n"

            for piece in re.findall(r"\s*\S+\s*|\s+", content):
                yield event(piece, None)
                self.chunks_sent[slot] += 1
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            yield event("", finish_reason)
            if with_usage:
                yield event(None, None, last_usage=True)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=reply.headers)


@contextmanager
def serve_openai(responder: Responder) -> Iterator[StubServer]:
    """Start a stub OpenAI-compatible server on 127.0.0.1 (a free port) in a thread; stop it on exit.

    It serves chat completions, and text completions (streamed or not) as vLLM serves them::

        def responder(request: dict) -> str | dict | Reply:
            return '{"preferred": "A"}'  # the assistant's text, wrapped in a full response

        with serve_openai(responder) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="x")
            ...
        server.requests  # every request body received, in arrival order
        server.max_in_flight  # the most requests the server was handling at once

    A responder returns the assistant text (str), a whole response body (dict), or a `Reply` to fail
    (`Reply(status=429, headers={"retry-after": "0"})`), to be slow (`Reply("ok", delay=2.0)`), or
    both; `Reply(usage=(prompt_tokens, completion_tokens))` fixes the reported usage (default: word
    counts), `Reply(cached_tokens=n)` adds ``usage.prompt_tokens_details.cached_tokens`` (vLLM's
    prefix-cache hits). A request's ``stop`` strings are honoured as vLLM does: the text ends before
    the first one found, which is not sent, and the finish reason is "stop". The responder is called
    in the server's event loop thread: keep it quick and make it thread-safe.

    ``POST /v1/completions`` (what `fspo.serve`'s remote backend sends: the prompt as a list of token
    ids) asks the same responder (the request has ``prompt`` instead of ``messages``). With
    ``"stream": true`` the text goes out as server-sent events, one chunk per word
    (``Reply(chunk_delay=...)`` paces them), then a chunk with ``Reply.finish_reason``, a usage chunk if
    ``stream_options.include_usage``, and ``data: [DONE]``. ``server.chunks_sent`` counts the text
    chunks each streamed request got, so a test can see a client close the stream early.
    """
    stub = StubServer(responder)
    with serve_in_thread(stub.app) as url:
        stub.base_url = f"{url}/v1"
        yield stub
