"""A scripted LLM for `fspo synth` tests: understands the shipped prompts, answers predictably.

Every reply is a pure function of the request (so an interrupted and an uninterrupted run get the
same answers), and `Flaky` injects failures keyed on the request content (malformed JSON, 429, 500,
slow replies) the first time a given request is seen, which the client must survive.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Any

from fspo.testing import Reply


def _h(*parts: str) -> int:
    return int(hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:8], 16)


def first_user(request: dict[str, Any]) -> str:
    return next(m["content"] for m in request["messages"] if m["role"] == "user")


def _between(text: str, start: str, end: str | None) -> str:
    tail = text.split(start, 1)[1]
    return (tail.split(end, 1)[0] if end else tail).strip()


def script(request: dict[str, Any]) -> str:
    """The well-formed reply to a request made from the shipped prompt templates."""
    text = first_user(request)
    if "trait dimensions" in text:
        n = int(re.search(r"Propose (\d+)", text).group(1))
        return json.dumps({"traits": [{"name": f"proposed{k}", "values": ["low", "high"]} for k in range(n)]})
    if text.startswith("Write a persona"):
        traits = _between(text, "has these traits:", "Describe")
        return json.dumps({"description": "You are a person. " + " ".join(traits.split())})
    if "Could someone playing this persona" in text:
        persona = _between(text, "Persona:", "Could someone")
        ok = "EXTENDED" in persona
        return json.dumps({"specific": ok, "missing": "" if ok else "tone preferences"})
    if "not specific enough" in text:
        persona = _between(text, "Persona:", "This persona")
        return json.dumps({"description": persona + " EXTENDED: you like concise answers."})
    if "different questions" in text:
        n = int(re.search(r"Write (\d+) different", text).group(1))
        batch = int(re.search(r"This is batch (\d+)", text).group(1))
        domain = _between(text, "Domain:", "—")
        qs = [f"Question {k} of batch {batch} about {domain}?" for k in range(n)]
        qs[-1] = f"what is the best {domain}"  # the same in every batch: de-duplicated
        return json.dumps({"questions": qs})
    if "Decompose" in text:
        n = int(re.search(r"into (\d+) clearly", text).group(1))
        return json.dumps({"viewpoints": [f"view{k}" for k in range(n)]})
    if "Answer it from this viewpoint" in text:
        q = _between(text, "Question:", "Answer it")
        view = _between(text, "viewpoint:", "Reply with")
        return json.dumps({"answer": f"An answer to '{q}' written from {view}."})
    if "which answer do you prefer" in text:
        persona = _between(text, "You are this person:", "Question:")
        a = _between(text, "Answer A:", "Answer B:")
        b = _between(text, "Answer B:", "As this person")
        question = _between(text, "Question:", "Answer A:")
        if _h(persona, question) % 5 == 0:  # this user is erratic on this question: always "A"
            return json.dumps({"preferred": "A"})
        return json.dumps({"preferred": "A" if _h(persona, a) > _h(persona, b) else "B"})
    raise AssertionError(f"unexpected prompt: {text[:80]}")


class Flaky:
    """Wraps `script`: the first time certain requests are seen, fail them in one way.

    Keyed on the request's first user message: 1 in `every` gets malformed JSON (its re-ask is a new
    request, answered well), then 429, then 500, then a reply slower than the client's timeout.
    """

    def __init__(self, every: int = 7, slow: float = 0.0):
        self.every = every
        self.slow = slow
        self.seen: set[str] = set()
        self.injected: dict[str, int] = {"malformed": 0, "429": 0, "500": 0, "slow": 0}
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> str | Reply:
        body = json.dumps(request["messages"], sort_keys=True)
        with self._lock:
            first = body not in self.seen
            self.seen.add(body)
        reask = sum(m["role"] == "user" for m in request["messages"]) > 1
        kind = _h(first_user(request)) % self.every
        if first and not reask:
            if kind == 0:
                self.injected["malformed"] += 1
                return "Sure! Here is the JSON: {not json at all"
            if kind == 1:
                self.injected["429"] += 1
                return Reply(status=429, headers={"retry-after": "0.01"})
            if kind == 2:
                self.injected["500"] += 1
                return Reply(status=500)
            if kind == 3 and self.slow:
                self.injected["slow"] += 1
                return Reply(script(request), delay=self.slow)
        return script(request)
