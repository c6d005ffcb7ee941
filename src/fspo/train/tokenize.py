"""Episodes → token ids for training: rendering, the token budget's accounting, the shared shots.

Rendering goes through the one template (`fspo.data.template.render`), so training sees exactly the
layout evaluation and serving use. Episodes are tokenized once up front (a few thousand episodes take
seconds) and kept as id lists; batching and padding happen per step (`fspo.infer.logps`), batch
order in `fspo.train.buckets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fspo.core.errors import UserError
from fspo.data.schema import Episode, Preference
from fspo.data.template import DescriptionMode, TemplateOptions, render, response_heading
from fspo.data.tokens import prompt_token_ids, target_token_ids
from fspo.infer.pairs import PairTokens
from fspo.infer.shots import shots_end


@dataclass(frozen=True)
class PairExample:
    """One tokenized episode: its pair's token ids and what grouping and the reference cache need.

    `shared` counts the leading prompt tokens that are the user's shots. It is only measured when
    asked (``split_shared=True``): episodes whose first `shared` tokens are equal can share one
    context row (`fspo.train.contexts`). 0 = not measured / none. `shot_spans` (asked with
    ``shot_spans=True``) are the ``[start, end)`` positions in the prompt ids of each shot's
    preferred answer, the extra targets of SFT's ``shot_loss``.
    """

    tokens: PairTokens
    episode_id: str = ""
    user_id: str = ""
    shared: int = 0
    shot_spans: tuple[tuple[int, int], ...] = ()


@dataclass
class RenderStats:
    """What the token budget cost; logged with the run so silent truncation cannot happen."""

    episodes: int = 0
    kept: int = 0
    shots_used: int = 0
    shots_dropped: int = 0
    over_budget: int = 0  # skipped: even zero shots do not fit `max_tokens`
    episodes_with_dropped_shots: int = 0
    # RAT targets: kept episodes whose query does not know the rejected answer's persona, so the
    # rejected target carries the user's own description (`fspo.data.template.rejected_description`).
    rejected_description_own: int = 0
    prompt_tokens: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = max(1, self.kept)
        return {
            "episodes": self.episodes,
            "kept": self.kept,
            "over_budget_skipped": self.over_budget,
            "shots_dropped": self.shots_dropped,
            "episodes_with_dropped_shots": self.episodes_with_dropped_shots,
            "rejected_description_own": self.rejected_description_own,
            "mean_shots_used": self.shots_used / n,
            "mean_prompt_tokens": sum(self.prompt_tokens) / n,
            "max_prompt_tokens": max(self.prompt_tokens, default=0),
        }


def limit_shots(episode: Episode, shots: int | None) -> Episode:
    """Keep at most `shots` shots (the first ones); 0 gives the zero-shot (population) episode."""
    if shots is None or len(episode.shots) <= shots:
        return episode
    return episode.model_copy(update={"shots": list(episode.shots[:shots])})


def check_descriptions(episodes: list[Episode], options: TemplateOptions, source: str) -> None:
    if options.description is DescriptionMode.NONE:
        return
    missing = sum(1 for e in episodes if not (e.description or "").strip())
    if missing:
        raise UserError(
            f"{missing} of {len(episodes)} episodes in {source} have no user description, but RAT "
            f"(description mode '{options.description.value}') needs one per episode: build episodes from "
            "users with descriptions, or train without --rat"
        )


def tokenize_episodes(
    episodes: list[Episode],
    tokenizer: Any,
    options: TemplateOptions,
    shots: int | None = None,
    split_shared: bool = False,
    shot_spans: bool = False,
) -> tuple[list[PairExample], RenderStats]:
    """Render and tokenize every episode; over-budget ones are skipped and counted, never cut mid-shot.

    The budget passed to the template leaves room for bos and eos, which are added as ids.
    Example ids are the episode ids, made unique (``id#2`` for a repeated id) because reference
    log-probs are cached per id. `split_shared` also measures each prompt's shared part (where the
    shots end, `fspo.infer.shots.shots_end`); the prompt ids are the same either way. `shot_spans`
    also locates each kept shot's preferred answer in the prompt ids (`preferred_answer_spans`).
    """
    budget_opts = options
    if options.max_tokens is not None:
        budget_opts = options.model_copy(update={"max_tokens": max(1, options.max_tokens - 2)})
    stats = RenderStats()
    eos = options.description is not DescriptionMode.ONLY  # a description alone: the answer follows
    out: list[PairExample] = []
    seen: dict[str, int] = {}
    shared_ids: dict[str, list[int]] = {}  # shared text -> its ids: a user's K questions share one
    for ep in episodes:
        stats.episodes += 1
        r = render(limit_shots(ep, shots), budget_opts, tokenizer)
        if r.over_budget:
            stats.over_budget += 1
            continue
        stats.kept += 1
        stats.shots_used += r.shots_used
        stats.shots_dropped += r.shots_dropped
        stats.episodes_with_dropped_shots += int(r.shots_dropped > 0)
        if (
            options.description in (DescriptionMode.TARGET, DescriptionMode.ONLY)
            and not ep.query.rejected_description
        ):
            stats.rejected_description_own += 1
        p = prompt_token_ids(tokenizer, r.prompt)
        stats.prompt_tokens.append(len(p))
        n = seen[ep.episode_id] = seen.get(ep.episode_id, 0) + 1
        shared = 0
        if split_shared:
            shared = shots_end(tokenizer, r.prompt, p, ep.query.question, shared_ids)
        spans: tuple[tuple[int, int], ...] = ()
        if shot_spans:
            kept = limit_shots(ep, shots).shots[r.shots_dropped :]
            spans = preferred_answer_spans(tokenizer, r.prompt, p, kept, options)
        out.append(
            PairExample(
                PairTokens(
                    p,
                    target_token_ids(tokenizer, r.chosen, eos),
                    target_token_ids(tokenizer, r.rejected, eos),
                ),
                ep.episode_id if n == 1 else f"{ep.episode_id}#{n}",
                ep.user_id,
                shared,
                spans,
            )
        )
    return out, stats


def preferred_answer_spans(
    tokenizer: Any,
    prompt: str,
    prompt_ids: list[int],
    shots: Sequence[Preference],
    options: TemplateOptions,
) -> tuple[tuple[int, int], ...]:
    """``[start, end)`` positions in `prompt_ids` of each shot's preferred answer (with its newline).

    Found the way the template writes them (heading, answer, newline), in order, then mapped to
    tokens through the tokenizer's offsets: a token belongs to an answer when it starts inside it.
    `prompt_ids` may lead with bos (`prompt_token_ids`); the offsets are shifted accordingly.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("shot_loss needs a fast tokenizer (character offsets of tokens)")
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    lead = len(prompt_ids) - len(enc["input_ids"])
    heading = response_heading(options)
    spans: list[tuple[int, int]] = []
    at = 0
    for shot in shots:
        piece = heading + shot.chosen.strip() + "\n"
        found = prompt.find(piece, at)
        if found < 0:  # cannot happen for prompts rendered by the template; never label blindly
            raise ValueError(f"shot answer not found in the rendered prompt: {shot.chosen[:40]!r}")
        begin, at = found + len(heading), found + len(piece)
        tokens = [i for i, (a, _) in enumerate(enc["offset_mapping"]) if begin <= a < at]
        if tokens:
            spans.append((tokens[0] + lead, tokens[-1] + 1 + lead))
    return tuple(spans)
