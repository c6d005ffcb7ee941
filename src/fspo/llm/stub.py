"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 (FastAPI + uvicorn, in a thread).

For tests and benchmarks of everything built on `fspo.llm` (retries, re-asks, caching, concurrency,
throughput) without a real endpoint. Usage::

    def responder(request: dict) -> str | dict | Reply:
        return '{"preferred": "A"}'            # the assistant's text, wrapped in a full response

    with serve_openai(responder) as server:  # listens on 127.0.0.1, a free port
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        ...
    server.requests       # every request body received, in arrival order
    server.max_in_flight  # the most requests the server was handling at once

A responder returns the assistant text (str), a whole response body (dict), or a `Reply` to fail
(`Reply(status=429, headers={"retry-after": "0"})`), to be slow (`Reply("ok", delay=2.0)`), or both;
`Reply(usage=(prompt_tokens, completion_tokens))` fixes the reported usage (default: word counts).
It is called in the server's event loop thread: keep it quick and make it thread-safe.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class Reply:
    content: str | None = None
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens); default: word counts


Responder = Callable[[dict[str, Any]], "str | dict[str, Any] | Reply"]


def user_text(request: dict[str, Any]) -> str:
    """The content of the last user message of a chat request (what most responders look at)."""
    return next(m["content"] for m in reversed(request["messages"]) if m["role"] == "user")


def chat_body(content: str, model: str, usage: tuple[int, int]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }


class StubServer:
    def __init__(self, responder: Responder):
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.post("/chat/completions")(self._chat)

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
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
            content = reply.content or ""
            words_in = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
            usage = reply.usage or (words_in, len(content.split()))
            return JSONResponse(chat_body(content, body.get("model", "stub"), usage), headers=reply.headers)
        finally:
            self.in_flight -= 1


@contextmanager
def serve_openai(responder: Responder) -> Iterator[StubServer]:
    """Start a stub server on 127.0.0.1 (free port) in a thread; stop it on exit."""
    stub = StubServer(responder)
    config = uvicorn.Config(stub.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the stub OpenAI server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    stub.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield stub
    finally:
        server.should_exit = True
        thread.join(timeout=10)
