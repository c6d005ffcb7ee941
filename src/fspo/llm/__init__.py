"""One client for every LLM request: backends, retries, the request cache, usage and cost, re-asks.

    backend = make_backend(cfg)                      # cfg: BackendConfig (openai HTTP or transformers)
    client = LLMClient(backend, cfg, RequestCache("cache.sqlite"))
    text = (await client.complete("stage", messages)).text
    reply = await client.ask("stage", messages, parse, reask)      # re-asks while parse raises
    pair = await ask_both_orders(ask, a, b)          # a pairwise question, both orders; pair.score

`fspo.synth` (LLM-made users and preferences) and the LLM judges of `fspo.eval.judges` are built on
it. Prices are per million tokens, as providers list them.
"""

from fspo.llm.backends import Backend, Completion, Messages, TransientError, make_backend
from fspo.llm.cache import RequestCache, request_key
from fspo.llm.client import BackendUnavailable, ClientStats, LLMClient, ParseFailure
from fspo.llm.config import BackendConfig
from fspo.llm.pairwise import LETTER_SCORES, BothOrders, ask_both_orders, both_orders
from fspo.llm.parsing import ParseError, parse_reply

__all__ = [
    "LETTER_SCORES",
    "Backend",
    "BackendConfig",
    "BackendUnavailable",
    "BothOrders",
    "ClientStats",
    "Completion",
    "LLMClient",
    "Messages",
    "ParseError",
    "ParseFailure",
    "RequestCache",
    "TransientError",
    "ask_both_orders",
    "both_orders",
    "make_backend",
    "parse_reply",
    "request_key",
]
