"""Requests per second of the LLM client (`fspo.llm.LLMClient`) against a local server with a fixed latency.

Starts the stub OpenAI server (`fspo.testing.serve_openai`) on 127.0.0.1, whose every reply takes `--latency`
seconds, and sends `--requests` distinct requests through `LLMClient` (the real openai client,
retries and accounting; no cache) at each concurrency limit. With a fixed latency L
and limit C the ideal is C / L requests per second: the table shows how close the client comes and
the most requests the *server* saw in flight at once (it should equal C). The last line is one JSON
object with every row.

    .venv/bin/python benchmarks/synth_throughput.py --latency 0.05 --requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from fspo.llm import BackendConfig, LLMClient
from fspo.llm.backends.openai_http import OpenAIBackend
from fspo.testing import Reply, serve_openai


async def _measure(base_url: str, concurrency: int, n: int) -> tuple[float, int]:
    cfg = BackendConfig(model="bench", base_url=base_url, max_concurrency=concurrency, timeout=30)
    client = LLMClient(OpenAIBackend(cfg), cfg)
    try:
        start = time.perf_counter()
        await asyncio.gather(
            *(client.complete("bench", [{"role": "user", "content": f"r{i}"}]) for i in range(n))
        )
        return time.perf_counter() - start, client.stats.max_in_flight
    finally:
        await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=0.05, help="Seconds the server takes per reply.")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with serve_openai(lambda r: Reply('{"ok": true}', delay=args.latency)) as server:
        print(f"{'concurrency':>11} {'req/s':>9} {'ideal':>9} {'efficiency':>10} {'in flight (server)':>19}")
        for c in args.concurrency:
            n = max(args.requests, 4 * c)
            server.max_in_flight = 0
            seconds, client_peak = asyncio.run(_measure(server.base_url, c, n))
            rps, ideal = n / seconds, c / args.latency
            row = {"concurrency": c, "requests": n, "seconds": round(seconds, 3), "rps": round(rps, 1)}
            row |= {"ideal_rps": round(ideal, 1), "efficiency": round(rps / ideal, 3)}
            rows.append(
                row | {"server_max_in_flight": server.max_in_flight, "client_max_in_flight": client_peak}
            )
            print(f"{c:>11} {rps:>9.1f} {ideal:>9.1f} {rps / ideal:>10.1%} {server.max_in_flight:>19}")
    print(json.dumps({"benchmark": "synth_throughput", "latency_s": args.latency, "rows": rows}))


if __name__ == "__main__":
    main()
