"""Run an ASGI app (FastAPI) with uvicorn on 127.0.0.1, in a thread, for tests, benchmarks and simulations.

Why: tests of the server, the scripted OpenAI stub, the load benchmark and `fspo study simulate` all
need a real HTTP server they can start and stop in-process; one helper binds loopback only, picks a
free port (port 0), waits until it accepts connections and always shuts it down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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
