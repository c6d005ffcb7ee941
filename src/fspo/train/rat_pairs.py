"""RAT's description pairs (the paper's v2): preference pairs over the model's own sampled descriptions.

For each training episode the current RAT model writes `samples` user descriptions from the shots
(seeded sampling). Each is scored against the user's true description; the best and the worst
become one RAT episode: its description is the best candidate and its query's rejected description
the worst. An FSPO run with `--rat description` on the written file trains on the two descriptions
alone (`DescriptionMode.ONLY`) and prefers descriptions closer to the truth, from what the model
itself writes. (`--rat target` would append each description's answer, the preferred one to the
best and the dispreferred one to the worst; a minimal pair's answers then reach IPO's target
margin by themselves and the descriptions get little push.) Episodes whose candidates all score
alike teach nothing and are left out (counted).

`include_true` adds the true description to the candidates (it scores best of all, so it is chosen
unless a sample is as good; the tie goes to the sample). Without it a model that is confidently
wrong, writing the same wrong description in every sample, gets no pair at all; with it, its own
mistake becomes the rejected target. A sample without the description heading counts as the text
it wrote in the description's place (cut at the first heading): a failed description is a negative.

Scoring (`description_scorer`): ``traits:<domain>`` compares the trait values the two descriptions
name (simulated users, `fspo.sim.base.Domain.description_score`); ``embedding[:<model>]`` compares
free text by sentence embeddings (`fspo.models.embedding`).

Why hand-written: no library samples from a model to build preference data over its own
intermediate text. Generation is `fspo.infer.generate.generate_batch`, the episodes' layout is the
one template's. Resumable: finished batches are appended to a log; a rerun samples only the rest,
with the same per-batch seeds, so the output equals an uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fspo.core.errors import UserError
from fspo.core.files import AppendLog, atomic_write_json
from fspo.data.io import write_records
from fspo.data.schema import Episode
from fspo.data.template import TemplateOptions, parse_generation
from fspo.infer.generate import Decoding, Mode, batch_seed, generate_batch, prompt_ids

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
PAIRS_FILE = "train.jsonl"
STATS_FILE = "rat_pairs.json"


def description_scorer(similarity: str) -> Scorer:
    """``traits:<domain>`` (a simulated domain's trait values) or ``embedding[:<model folder>]``."""
    kind, _, arg = similarity.partition(":")
    if kind == "traits":
        from fspo.sim import get_domain

        if not arg:
            raise UserError("--similarity traits needs the simulated domain: traits:<domain>")
        dom = get_domain(arg)
        return lambda inferred, true: [
            dom.description_score(i, t) for i, t in zip(inferred, true, strict=True)
        ]
    if kind == "embedding":
        from fspo.models.embedding import PACKAGED, EmbeddingSimilarity

        return EmbeddingSimilarity(arg or PACKAGED)
    raise UserError(f"--similarity {similarity!r}: use traits:<domain> or embedding[:<model folder>]")


class PairSampling(BaseModel):
    """How descriptions are sampled and paired: the one home of these defaults, for `build_rat_pairs`
    and the flags of `fspo train rat-pairs`."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(4, ge=2, description="descriptions sampled per episode (two make a pair)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (pairs need sampling)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(48, ge=1, description="token budget of one description")
    batch_size: int = Field(4, ge=1, description="episodes per generation batch (each gives `samples` rows)")
    seed: int = Field(0, description="seed of the sampling (per batch, from its episodes)")
    include_true: bool = Field(
        True, description="count the true description among the candidates (off: samples only)"
    )


def build_rat_pairs(
    model: Any,
    tokenizer: Any,
    episodes: Sequence[Episode],
    out: str | Path,
    *,
    scorer: Scorer,
    options: TemplateOptions | None = None,
    progress: bool = False,
    **sampling: Any,
) -> dict[str, Any]:
    """Sample, score and pair descriptions for `episodes`; writes ``out/train.jsonl`` (the pairs, as
    RAT episodes) and ``out/rat_pairs.json`` (the statistics, returned). `sampling`: `PairSampling`'s
    fields (samples, temperature, top_p, max_new_tokens, batch_size, seed, include_true)."""
    try:
        s = PairSampling.model_validate(sampling)
    except ValidationError as err:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise UserError(f"description pair sampling: {bad}") from None
    samples, temperature, top_p, batch_size, seed = s.samples, s.temperature, s.top_p, s.batch_size, s.seed
    missing = [e.episode_id for e in episodes if not (e.description or "").strip()]
    if missing:
        raise UserError(
            f"{len(missing)} episodes have no true description to score against, e.g. {missing[0]}"
        )
    out = Path(out)
    settings = {"samples": samples, "temperature": temperature, "top_p": top_p, "seed": seed}
    log_path = out / "samples.partial"
    done, started = _resume(log_path, settings)
    encoded = [(e, prompt_ids(e, tokenizer, Mode.RAT, options=options)) for e in episodes]
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    todo = [b for b in batches if any(e.episode_id not in done for e, _ in b)]
    log = AppendLog(log_path)
    try:
        if not started:
            log.append({"settings": settings})
        if progress:
            from tqdm import tqdm

            todo = tqdm(todo, desc="sample descriptions", unit="batch")
        for chunk in todo:
            rows = [ids for _, ids in chunk for _ in range(samples)]
            new = generate_batch(
                model,
                tokenizer,
                rows,
                rat=True,
                description_only=True,
                max_new_tokens=s.max_new_tokens,
                decoding=Decoding.of(
                    "rat-pairs",
                    temperature=temperature,
                    top_p=top_p,
                    seed=batch_seed(seed, [e.episode_id for e, _ in chunk]),
                ),
            )
            texts = [_description(tokenizer.decode(ids, skip_special_tokens=True)) for ids in new]
            truths = [e.description or "" for e, _ in chunk for _ in range(samples)]
            scores = scorer(texts, truths)
            for i, (episode, _) in enumerate(chunk):
                got = slice(i * samples, (i + 1) * samples)
                if episode.episode_id in done:  # a batch a kill cut part-way: keep what was written
                    continue
                done[episode.episode_id] = {
                    "episode_id": episode.episode_id,
                    "samples": texts[got],
                    "scores": scores[got],
                }
                log.append(done[episode.episode_id])
    finally:
        log.close()
    pairs, stats = _pairs(episodes, done, scorer if s.include_true else None)
    write_records(out / PAIRS_FILE, pairs)
    stats = {**settings, "include_true": s.include_true, **stats}
    atomic_write_json(out / STATS_FILE, stats)
    log_path.unlink(missing_ok=True)
    return stats


def _resume(log_path: Path, settings: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], bool]:
    """A killed run's finished episodes, and whether its log has begun (its settings line)."""
    if not log_path.exists():
        return {}, False
    log = AppendLog(log_path)  # opening cuts a torn last line
    log.close()
    records = list(log.read())
    if not records:
        return {}, False
    if records[0].get("settings") != settings:
        raise UserError(
            f"{log_path} holds samples drawn with other settings ({records[0].get('settings')}); "
            "remove it or use another output folder"
        )
    return {r["episode_id"]: r for r in records[1:]}, True


def _description(text: str) -> str:
    """What a sample wrote as its description: the parsed one, or the text in its place."""
    parsed = parse_generation(text)
    if parsed.description is not None:
        return parsed.description
    head, _, _ = text.partition("\n#")
    return head.strip()


def _pairs(
    episodes: Sequence[Episode], done: dict[str, dict[str, Any]], true_scorer: Scorer | None
) -> tuple[list[Episode], dict[str, Any]]:
    """Best and worst candidate of each episode as its chosen and rejected descriptions; the true
    description is a candidate when `true_scorer` (the run's scorer) is given."""
    pairs: list[Episode] = []
    ties = empty = true_chosen = 0
    all_scores: list[float] = []
    truths = [e.description or "" for e in episodes]
    true_scores = true_scorer(truths, truths) if true_scorer is not None else [None] * len(episodes)
    for e, true_score in zip(episodes, true_scores, strict=True):
        rec = done[e.episode_id]
        scored = [(s, t) for s, t in zip(rec["scores"], rec["samples"], strict=True) if t.strip()]
        all_scores += rec["scores"]
        empty += len(rec["samples"]) - len(scored)
        candidates = scored + ([(true_score, e.description or "")] if true_score is not None else [])
        if not candidates:
            ties += 1
            continue
        best = max(candidates, key=lambda st: st[0])  # max/min keep the first of equals: a sample
        worst = min(candidates, key=lambda st: st[0])
        if best[0] == worst[0]:
            ties += 1
            continue
        true_chosen += best[1] == e.description and all(st[0] < best[0] for st in scored)
        query = e.query.model_copy(update={"rejected_description": worst[1]})
        meta = {**e.metadata, "true_description": e.description, "description_scores": [best[0], worst[0]]}
        pairs.append(e.model_copy(update={"description": best[1], "query": query, "metadata": meta}))
    n = max(1, len(all_scores))
    return pairs, {
        "episodes": len(episodes),
        "pairs": len(pairs),
        "true_description_chosen": true_chosen,
        "ties_left_out": ties,
        "empty_samples": empty,
        "mean_score": sum(all_scores) / n,
        "perfect_share": sum(s >= 1.0 for s in all_scores) / n,
    }
