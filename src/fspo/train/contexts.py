"""Episodes -> contexts: up to K questions of one user that share the same shots, as one row.

Why: with prefix sharing a row already runs the shots once for two answers; K questions per
context run them once for 2K answers (``[shots | q1 | c1 | r1 | q2 | c2 | r2 ...]``). Only episodes
whose shared token ids are *identical* are grouped (same user, same shots kept by the token budget,
same template), and every pair keeps exactly the ids it has when tokenized alone, so the scores
equal the one-question-per-row path to float tolerance.

Which episodes share shots is decided when episodes are built: `fspo.data.episodes.build_episodes`
with ``questions_per_context=K`` gives each drawn shot set K queries (its default of 1 gives every
episode its own shots, and then nothing groups).

Grouping is deterministic: groups are filled in file order, K at a time, so the same file gives the
same contexts on every run and every process; the trainer's batch order (seeded) sits on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fspo.core.errors import UserError
from fspo.data.episodes import episodes_file, load_episodes
from fspo.data.template import TemplateOptions
from fspo.data.tokens import prompt_token_ids, target_token_ids
from fspo.infer.pairs import ContextTokens, PairTokens, QuestionTokens, as_context
from fspo.train.config import TrainConfig
from fspo.train.tokenize import RenderStats, check_descriptions, tokenize_episodes


class Unit(NamedTuple):
    """What the trainer batches: one context row and the (unique) episode id of each question.

    A tuple ``(ids, context)``, so it is also what `fspo.train.refcache` takes as a keyed item.
    """

    ids: tuple[str, ...]
    context: ContextTokens

    def pairs(self) -> list[PairTokens]:
        return self.context.pairs()


def group_examples(examples: Sequence[Any], k: int = 1) -> list[Unit]:
    """Contexts of up to `k` examples with the same user and the same shared ids, in file order.

    `examples` are `fspo.train.tokenize.PairExample`s; with k > 1 they need their `shared` length
    (``tokenize_episodes(..., split_shared=True)``). An example with no shared part stays alone, as
    a context whose shared segment is its whole prompt (exactly the k=1 row). Contexts come out in
    the order of their first example; a group that reaches `k` is closed and a new one opened.
    """
    if k < 1:
        raise UserError(f"questions_per_context must be >= 1, got {k}")
    if k == 1:
        return [Unit((e.episode_id,), ContextTokens.of(e.tokens)) for e in examples]
    open_groups: dict[tuple, int] = {}  # key -> index in `groups` of the group still filling
    groups: list[list[Any]] = []
    for e in examples:
        key = (e.user_id, tuple(e.tokens.prompt[: e.shared])) if e.shared > 0 else None
        i = open_groups.get(key) if key is not None else None
        if i is None or len(groups[i]) >= k:
            groups.append([e])
            if key is not None:
                open_groups[key] = len(groups) - 1
        else:
            groups[i].append(e)
    return [_unit(g) for g in groups]


def _unit(group: list[Any]) -> Unit:
    if len(group) == 1:
        return group_examples(group, 1)[0]
    n = group[0].shared
    items = [QuestionTokens(e.tokens.prompt[n:], e.tokens.chosen, e.tokens.rejected) for e in group]
    return Unit(tuple(e.episode_id for e in group), ContextTokens(group[0].tokens.prompt[:n], items))


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> PairTokens:
    """The trainer's tokenization (`fspo.infer.logps`): [bos] + prompt ids, each target alone + eos.

    Tokenizing the targets separately keeps the prompt/target boundary identical for both answers,
    which is what makes a shared prefix possible at all.
    """
    return PairTokens(
        prompt_token_ids(tokenizer, prompt),
        target_token_ids(tokenizer, chosen),
        target_token_ids(tokenizer, rejected),
    )


def tokenize_contexts(
    tokenizer: Any, episodes: Sequence[Any], options: Any = None, k: int = 1
) -> list[tuple[list[str], ContextTokens]]:
    """Render and tokenize episodes, putting up to `k` episodes with the same shots in one context.

    Returns ``(episode_ids, context)`` per context (see `group_examples`). The prompt is split where
    the query's ``## Question`` block starts: that block (and anything after it, e.g. the chat
    template's assistant header) is the question segment, everything before is shared. Episodes
    over the token budget (``options.max_tokens``) are skipped, as in training.
    """
    if k < 1:
        raise UserError(f"questions per context must be >= 1, got {k}")
    examples, _ = tokenize_episodes(
        list(episodes), tokenizer, options or TemplateOptions(), split_shared=k > 1
    )
    return [(list(u.ids), u.context) for u in group_examples(examples, k)]


def load_contexts(
    cfg: TrainConfig, path: str, split: str, tokenizer: Any, limit: int | None = None
) -> tuple[list[Unit], RenderStats, Path, dict[str, Any]]:
    """The episodes of `path`'s `split` (the first `limit`) as the training contexts of `cfg`
    (`questions_per_context` per row at most); their render stats; the episodes file itself (where
    the reference cache goes); and with ``shot_loss`` the shots' answer positions per episode id
    (else empty)."""
    file = episodes_file(path, split)
    episodes = load_episodes(file, limit=limit)
    if not episodes:
        raise UserError(f"episodes file {file} is empty")
    options = cfg.template_options()
    check_descriptions(episodes, options, path)
    k = cfg.questions_per_context
    examples, stats = tokenize_episodes(
        episodes, tokenizer, options, cfg.shots, split_shared=k > 1, shot_spans=cfg.shot_loss
    )
    units = group_examples(examples, k)
    spans = {u.ids[0]: e.shot_spans for u, e in zip(units, examples, strict=True)} if cfg.shot_loss else {}
    return units, stats, file, spans


def row_stats(context: PairTokens | ContextTokens, shared: bool) -> tuple[int, int, int]:
    """(rows, real tokens, longest row) the scorer builds for one context: a batch pads to the longest.

    Shared path: one row holding the whole context. Plain path: a row of prompt + answer per
    non-empty answer (SFT's contexts carry no rejected answer).
    """
    ctx = as_context(context)
    if shared:
        return 1, len(ctx), len(ctx)
    rows = [
        len(ctx.shared) + len(q.question) + len(t) for q in ctx.items for t in (q.chosen, q.rejected) if t
    ]
    return len(rows), sum(rows), max(rows)
