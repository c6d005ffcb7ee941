"""Wall time of personalized best-of-N (shared prefix) against one sampled answer, per episode.

Why: best-of-N is only worth offering if its cost stays a small multiple of one answer's. Its N samples
share one prefill of the prompt (the cache repeated N times) and decode as one batch; each model then
scores the N answers against one pass over its prompt (`fspo.infer.best_of`). This times, episode by
episode and interleaved, one sampled answer (`generate_batch`, one row) and best-of-N (`best_of_n`,
with its reference), and splits best-of-N into its generation and its scoring.

    .venv/bin/python benchmarks/best_of.py                      # the toy world's tiny Llama, a few seconds
    .venv/bin/python benchmarks/best_of.py --model runs/quickstart/fspo/model \\
        --episodes runs/quickstart/episodes --ref runs/quickstart/sft/model

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any


def _world(args: argparse.Namespace) -> tuple[Any, Any, Any, list[Any], Any]:
    """(model, tokenizer, reference, episodes, layout): a model folder's, or the toy world's tiny Llama."""
    from fspo.infer.best_of import SELF, Reference, training_reference

    if args.model is None:
        from fspo.data.template import TemplateOptions, render
        from fspo.testing import tiny_lm, toy_episodes, toy_users

        episodes = toy_episodes(toy_users(8), per_user=2, shots=4)
        model, tok = tiny_lm([render(e).prompt + render(e).chosen for e in episodes] * 3)
        return model, tok, Reference(None, SELF), episodes, TemplateOptions()
    from fspo.eval.readers import load_test_episodes
    from fspo.infer.layout import trained_layout
    from fspo.models.loading import load_model, load_tokenizer

    folder, beta = training_reference(args.model, args.ref)
    ref = Reference(None if folder is None else load_model(folder).eval(), folder or SELF, beta)
    model, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    return model, tok, ref, load_test_episodes(args.episodes), trained_layout(args.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: the toy world's tiny Llama)")
    ap.add_argument("--episodes", help="episodes of --model (file or folder)")
    ap.add_argument("--ref", help="reference folder (default: the model's training reference)")
    ap.add_argument("--n", type=int, default=8, help="samples per episode")
    ap.add_argument("--episodes-timed", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    if args.model is not None and args.episodes is None:
        ap.error("--model needs --episodes")

    from fspo.infer.best_of import best_of_n
    from fspo.infer.generate import Decoding, generate_batch, prefill, prompt_ids_for

    model, tok, ref, episodes, layout = _world(args)
    decoding = Decoding(temperature=args.temperature, seed=0)
    times: dict[str, list[float]] = {"one": [], "best_of": [], "best_of_generation": []}
    tokens = {"one": 0, "generated": 0, "scored": 0}
    for e in episodes[: args.episodes_timed]:
        ids = prompt_ids_for(e.shots, e.query.question, tok, "plain", layout)
        kw = {"rat": False, "max_new_tokens": args.max_new_tokens, "decoding": decoding}
        start = time.perf_counter()
        one = generate_batch(model, tok, [ids], seeds=[decoding.row_seed(e.episode_id)], **kw)
        times["one"].append(time.perf_counter() - start)
        start = time.perf_counter()
        seeds = [decoding.row_seed(e.episode_id, j) for j in range(args.n)]
        generate_batch(model, tok, [ids] * args.n, seeds=seeds, cache=prefill(model, ids[:-1], args.n), **kw)
        times["best_of_generation"].append(time.perf_counter() - start)
        start = time.perf_counter()
        result = best_of_n(
            model, tok, e.shots, e.query.question, n=args.n, decoding=decoding, key=e.episode_id,
            reference=ref, max_new_tokens=args.max_new_tokens, options=layout,
        )  # fmt: skip
        times["best_of"].append(time.perf_counter() - start)
        tokens["one"] += len(one[0])
        tokens["generated"] += result.generated_tokens
        tokens["scored"] += result.scored_tokens
    ms = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
    ratio = round(ms["best_of"] / ms["one"], 2)
    name = args.model or "toy tiny Llama"
    print(f"model: {name}; {len(times['one'])} episodes, median per episode; reference: {ref.name}")
    print(f"one sampled answer:         {ms['one']:8.1f} ms ({tokens['one']} tokens in all)")
    print(f"best-of-{args.n}, generation only: {ms['best_of_generation']:8.1f} ms")
    print(f"best-of-{args.n}, with scoring:    {ms['best_of']:8.1f} ms ({ratio}x one answer)")
    print(f"best-of-{args.n} tokens in all: {tokens['generated']} generated, {tokens['scored']} scored")
    summary = {"model": name, "n": args.n, "ms_median": ms, "ratio_best_of_to_one": ratio, "tokens": tokens}
    print(json.dumps({**summary, "reference": ref.name, "max_new_tokens": args.max_new_tokens}))


if __name__ == "__main__":
    main()
