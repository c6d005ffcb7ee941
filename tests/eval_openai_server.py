"""A minimal OpenAI-compatible chat-completions server for tests, on a real local HTTP port.

`responder(request_body, call_number)` returns the assistant's text, or an int HTTP status to fail
that call (429/500 responses carry ``retry-after-ms: 1`` so the client's backoff stays fast). The
server records every request it receives, so tests can assert "no new requests" on a cached re-run.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[dict[str, Any], int], "str | int"]


@dataclass
class StubServer:
    base_url: str
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.requests)


@contextmanager
def openai_server(responder: Responder) -> Iterator[StubServer]:
    lock = threading.Lock()
    state = StubServer(base_url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            with lock:
                state.requests.append(body)
                n = len(state.requests)
            reply = responder(body, n)
            if isinstance(reply, int):
                payload = json.dumps({"error": {"message": f"stub status {reply}", "type": "stub"}}).encode()
                self.send_response(reply)
                self.send_header("retry-after-ms", "1")
            else:
                payload = json.dumps(
                    {
                        "id": f"stub-{n}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "stub"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": reply},
                            }
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
                    }
                ).encode()
                self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
