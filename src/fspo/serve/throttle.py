"""Slowing down guesses: a client that sent too many wrong study codes or resume codes waits.

Hand-written because what is counted is *failures* of one kind, per client, and the refusal must be the
API's JSON error: rate-limit libraries for Starlette (slowapi) count every request to a route, so a
class of people joining from one school network would be refused for succeeding.

The count lives in this process's memory: with several server processes each keeps its own, so a
guesser gets at most that many times the limit (and codes have far too many values to guess anyway:
`fspo.serve.store.participants`). It holds at most `max_clients` clients, dropping the stalest first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from fspo.serve.errors import APIError


class Throttle:
    """At most `max_failures` failures per client within `window_s` seconds; past that, `check` answers
    429 with the seconds to wait (``Retry-After``) until the oldest failure leaves the window."""

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 60.0,
        *,
        max_clients: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()  # the study's routes run in a threadpool

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def check(self, client: str) -> None:
        """A 429 when `client` may not try now."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                return
            wait = max(1, math.ceil(times[0] + self.window_s - now))
        raise APIError(
            429,
            f"too many wrong codes from your address: try again in {wait} s",
            code="too_many_attempts",
            headers={"Retry-After": str(wait)},
        )

    def failed(self, client: str) -> None:
        """Count one failure of `client`."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            times.append(now)
            self._failures[client] = times
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
