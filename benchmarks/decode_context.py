"""Cost of one decoding step vs the length of the context already in the KV cache.

Why: a cached 8-shot answer skips the prefill of its shots but still decodes every new token over
the whole ~900-token context, where a zero-shot answer decodes over ~40. This measures what that
costs per token with transformers' `DynamicCache` (the cache `model.generate` and the serving prefix
cache use), interleaving the context lengths, and profiles one long-context step to show where the
extra time goes (`aten::cat`: the cache grows its tensors by concatenation at every token).

    .venv/bin/python benchmarks/decode_context.py --model runs/smollm2 --lengths 40 900

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a causal LM folder (e.g. runs/smollm2)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[40, 900])
    ap.add_argument("--steps", type=int, default=20, help="decoding steps timed per measurement")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every length")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from fspo.infer.generate import cache_kwarg
    from fspo.models.loading import load_model

    model = load_model(args.model).eval()
    key = cache_kwarg(model)
    torch.manual_seed(0)
    token = torch.tensor([[5]])

    def filled(length: int) -> DynamicCache:
        kv = DynamicCache(config=model.config)
        model(input_ids=torch.randint(0, 1000, (1, length)), use_cache=True, **{key: kv})
        return kv

    times: dict[int, list[float]] = {n: [] for n in args.lengths}
    with torch.no_grad():
        for _ in range(args.reps):
            for n in args.lengths:
                kv = filled(n)
                start = time.perf_counter()
                for _ in range(args.steps):
                    model(input_ids=token, use_cache=True, **{key: kv})
                times[n].append((time.perf_counter() - start) / args.steps)
        kv = filled(max(args.lengths))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                model(input_ids=token, use_cache=True, **{key: kv})
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    share = {
        e.key: round(e.self_cpu_time_total / total, 3)
        for e in prof.key_averages()
        if e.key in ("aten::mm", "aten::cat") or "scaled_dot_product" in e.key
    }
    ms = {n: round(1000 * min(t), 2) for n, t in times.items()}
    shortest = min(args.lengths)
    for n in args.lengths:
        print(f"context {n:5d}: {ms[n]:7.2f} ms per decoding step ({ms[n] / ms[shortest]:.2f}x)")
    print(f"self-CPU share of one step at context {max(args.lengths)}: {share}")
    print(json.dumps({"model": args.model, "ms_per_step": ms, "profile_share": share}))


if __name__ == "__main__":
    main()
