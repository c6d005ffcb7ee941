"""An answer's text as it is generated: the deltas a streamed response sends.

Only text that belongs to the final answer is sent: nothing of RAT's description or of any heading,
and nothing past the cut that `parse_generation` will make (a line is only sent once its first
character shows it is no heading; a decode ending in a partial UTF-8 character waits for the next
token). The deltas concatenate to the final answer's text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fspo.data.template import parse_generation

log = logging.getLogger(__name__)

TextSink = Callable[[str], None]


class AnswerStream:
    """Turns the growing raw continuation into deltas of the answer `parse_generation` will cut.

    Monotone by construction: a delta is sent only when the answer parsed so far extends what was
    sent. For text without '#' lines that holds token by token, because a line that does not start
    with '#' can never become a heading and the RAT answer only starts after the response heading's
    line is complete.
    """

    def __init__(self, on_text: TextSink | None):
        self.on_text = on_text
        self.sent = ""

    def update(self, raw: str) -> None:
        if self.on_text is None or raw.endswith("\ufffd"):  # a partial UTF-8 character so far
            return
        self._send(parse_generation(raw).answer)

    def finish(self, answer: str) -> None:
        if self.on_text is None:
            return
        if not answer.startswith(self.sent):
            # Only when the whole continuation reinterprets earlier text (parse_generation reads a
            # '## User Description' anywhere as RAT's description): what was sent cannot be taken back.
            log.warning("streamed answer text %r is not a prefix of the final answer %r", self.sent, answer)
            return
        self._send(answer)

    def _send(self, answer: str) -> None:
        if len(answer) > len(self.sent) and answer.startswith(self.sent):
            delta, self.sent = answer[len(self.sent) :], answer
            assert self.on_text is not None
            self.on_text(delta)


def token_streamer(tokenizer: Any, stream: AnswerStream) -> Any:
    """A transformers streamer feeding the decoded new tokens to `stream` as `generate` makes them."""
    from transformers.generation.streamers import BaseStreamer

    class AnswerStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.ids: list[int] = []
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # generate first puts the prompt's ids
                self.prompt_seen = True
                return
            self.ids.extend(int(i) for i in value.reshape(-1).tolist())
            stream.update(tokenizer.decode(self.ids, skip_special_tokens=True))

        def end(self) -> None:
            pass

    return AnswerStreamer()
