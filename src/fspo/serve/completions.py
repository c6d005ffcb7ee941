"""The one handler of ``POST /v1/chat/completions`` and ``POST /v1/completions``: the two endpoints
answer the same way (`fspo.serve.serving` resolves the request, the system generates, the request's
stop sequences cut the text) and differ only in the shape of their response (`Shape`).

Streamed (``"stream": true``), the answer goes out as server-sent events as the system generates it.
A request for several samples (``n``, ``best_of``) is answered whole, one choice per answer kept.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from fspo.serve.answerers import Answer, Answerer
from fspo.serve.errors import raise_generation_failure, stream_error
from fspo.serve.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    CompletionResponse,
    Finished,
    FspoInfo,
    GenerationBody,
    Head,
    Usage,
)
from fspo.serve.serving import Prepared, choose, generate, prepare


@dataclass(frozen=True)
class Shape:
    """How one endpoint words an answer: its id's prefix, the whole response, a streamed event (a text
    delta, or None for none, and the finish reason once known), and the event that opens a stream."""

    id_prefix: str
    reply: Callable[[Head, list[Finished], Usage, FspoInfo], CompletionResponse]
    chunk: Callable[[Head, str | None, str | None], CompletionResponse]
    opening: Callable[[Head], CompletionResponse] | None = None


CHAT = Shape("chatcmpl", ChatCompletion.of, ChatCompletionChunk.of, ChatCompletionChunk.opening)
TEXT = Shape("cmpl", Completion.of, Completion.chunk)


class StopCut:
    """Cuts a text stream at the first of the request's stop sequences.

    A stop sequence may arrive split across deltas, so the last ``longest - 1`` characters are held
    back until the next delta (or the end) shows whether they begin one.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def finish_reason(self, answer: Answer) -> str:
        return "stop" if self.stopped else answer.finish_reason


async def complete(
    app: FastAPI, user_id: str, body: ChatCompletionRequest | CompletionRequest, shape: Shape
) -> CompletionResponse | StreamingResponse:
    """`user_id`'s answer to `body`, whole or streamed, worded as `shape` says."""
    prepared = await run_in_threadpool(prepare, app, user_id, body)
    head = Head(
        id=f"{shape.id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=prepared.system.name
    )
    if body.stream:
        return await _start_stream(app, prepared, body, shape, head)
    answerer = prepared.system.answerer
    if prepared.several:
        choices = await choose(app, prepared)
        finished = [_finished(body, answer) for answer in choices.answers]
        cut_off = sum(
            _cut_tokens(answerer, a, text) for a, (text, _) in zip(choices.answers, finished, strict=True)
        )
        usage = Usage.of(choices, cut_off)
        return shape.reply(head, finished, usage, prepared.fspo(choices.answers[0], choices))
    answer = await generate(app, prepared.system, prepared.request)
    text, finish = _finished(body, answer)
    usage = Usage.of(answer, _cut_tokens(answerer, answer, text))
    return shape.reply(head, [(text, finish)], usage, prepared.fspo(answer))


def _finished(body: GenerationBody, answer: Answer) -> Finished:
    """`answer`'s text cut at the request's first stop sequence, and why it ended."""
    cut = StopCut(body.stop_sequences)
    text = cut.feed(answer.text) + cut.flush()
    return text, cut.finish_reason(answer)


def _cut_tokens(answerer: Answerer, answer: Answer, returned: str) -> int:
    """The completion tokens of `answer` that a stop sequence cut off (0 when `returned` is its whole
    text), so that `usage` counts what was returned, as a server stopping at the sequence would. The
    generation itself ran to its end, so the cut part is counted by tokenizing it: the tokens of the
    whole answer less those of the part returned."""
    if returned == answer.text:
        return 0
    return max(answerer.count_tokens(answer.text) - answerer.count_tokens(returned), 0)


class _ClientGone(Exception):
    """Raised inside `on_text` once the client of a stream has left, to stop generating for nobody."""


async def _start_stream(
    app: FastAPI, prepared: Prepared, body: GenerationBody, shape: Shape, head: Head
) -> StreamingResponse:
    """The server-sent events of one streamed completion.

    The generation starts here, and its first event (a text delta, the end, or a failure) is awaited
    before the response begins: a request that fails before any text (a prompt longer than the
    model's context, the model's server down, a crash) gets the status and JSON error it would get unstreamed
    (400, 502, 500). Only a failure after text was sent, when the status line is long gone, becomes an
    error event in the stream.

    The system generates in the generation pool and hands each text delta to `on_text`, which posts
    it to this request's queue through the event loop (the only thread-safe way into an asyncio
    queue). If the client disconnects, Starlette cancels the events' generator; `gone` then makes the
    next `on_text` raise, which ends the generation early.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    gone = threading.Event()

    def post(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server stopped while generating
            gone.set()

    def on_text(delta: str) -> None:
        if gone.is_set():
            raise _ClientGone
        post("text", delta)

    def work() -> None:
        try:
            post("done", prepared.system.answerer.answer(prepared.request, on_text=on_text))
        except _ClientGone:
            pass
        except Exception as err:  # raised as the response's error, or sent as an error event
            post("error", err)

    loop.run_in_executor(app.state.generation_pool, work)
    try:
        first = await queue.get()
    except BaseException:  # cancelled while waiting: nobody will read what is generated
        gone.set()
        raise
    if first[0] == "error":
        raise_generation_failure(prepared.system.name, first[1])
    # no-cache and no proxy buffering: each event must reach the client as it is generated.
    return StreamingResponse(
        _events(queue, first, gone, prepared, body, shape, head),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    queue: asyncio.Queue[tuple[str, Any]],
    first: tuple[str, Any],
    gone: threading.Event,
    prepared: Prepared,
    body: GenerationBody,
    shape: Shape,
    head: Head,
) -> AsyncIterator[str]:
    """The events of `_start_stream`, from its generation's `first` event on."""
    answerer = prepared.system.answerer
    cut = StopCut(body.stop_sequences)
    usage = body.include_usage
    kind, value = first
    sent = ""
    try:
        if shape.opening is not None:
            yield shape.opening(head).event(usage)
        while kind == "text":
            text = cut.feed(value)
            sent += text
            if text:
                yield shape.chunk(head, text, None).event(usage)
            kind, value = await queue.get()
        if kind == "error":
            yield f"data: {stream_error(prepared.system.name, value).model_dump_json()}\n\n"
        else:
            answer: Answer = value
            rest = cut.flush()
            sent += rest
            if rest:
                yield shape.chunk(head, rest, None).event(usage)
            end = shape.chunk(head, None, cut.finish_reason(answer))
            yield end.model_copy(update={"fspo": prepared.fspo(answer)}).event(usage)
            if usage:  # OpenAI's last event: no choices, the usage
                totals = shape.chunk(head, None, None).model_copy(
                    update={"choices": [], "usage": Usage.of(answer, _cut_tokens(answerer, answer, sent))}
                )
                yield totals.event(usage)
        yield "data: [DONE]\n\n"
    finally:
        gone.set()
