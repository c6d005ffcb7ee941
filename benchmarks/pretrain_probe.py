"""Does the pretrained embedded model follow a stated preference, or continue an author's style?

Why this exists: the oracle baseline (true description in the prompt) and RAT only work if the
model answers as a description says, and FSPO needs it to continue the style of a user's
examples. The paper's instruct model can do both before FSPO starts; ours must learn them in
pretraining (`fspo.sim.corpus`, `consistent` / `described` documents). This script pretrains a
fresh model on a given corpus mix, exactly as the quickstart's `model` stage does, then measures:

* ``p_bullet``: P(the answer's first token is "-") right after ``## User Description`` of a
  held-out described document, for descriptions that say "bullet points", "plain prose", or
  neither. A model that reads the description puts these far apart (the data: ~0.9 / ~0.15 / ~0.5);
* ``description_effect``: over all traits, for a training persona and a question, whether stating
  the description moves ``lp(best) - lp(worst)`` of the question's answer pool towards the
  persona's best answer (share of 200 cases; 0.5 = the description does nothing);
* ``style_effect``: the same with three of the persona's best answers as examples instead of a
  description (``# Example i`` documents): does the model continue an author's style?

    python benchmarks/pretrain_probe.py --work runs/pretrain_probe/em --consistent 0.8 \\
        --described 1.0 --answers 1 --template-docs 0 --block-size 512 --batch-size 8

``--template-docs -1`` adds every preference of ``--sim`` in the FSPO layout, as the quickstart
did before (``template_documents``); ``N > 0`` adds a random N of them.

``--probe MODEL`` skips pretraining and measures an existing model (e.g. a quickstart stage), adding
``oracle_p_bullet``: P("-") at the oracle's answer position of the first 150 unseen episodes of
``--episodes`` (true description in the prompt, 0 shots), by what the description says. That is
where the oracle baseline needs the description to matter. And ``episodes``: the shot effect of
the model as it is on the FSPO episodes of ``--episodes`` (`episode_shot_effect`).

``copy_effect`` / ``p_bullet_examples`` / ``p_bullet_preferred`` (`copy_effects`): does the model
continue the fixed style of a writer's examples (``--styled`` documents teach it)?
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fspo.data.episodes import load_episodes
from fspo.data.io import read_records
from fspo.data.schema import User
from fspo.data.template import (
    DESCRIPTION,
    PREFERRED,
    QUESTION,
    RESPONSE,
    TASK,
    TASK_ZERO_SHOT,
    DescriptionMode,
    TemplateOptions,
    render_context,
)
from fspo.models.default import init_model
from fspo.models.loading import load_model, load_tokenizer
from fspo.models.pretrain import pretrain
from fspo.quickstart import load_profile, pretraining_texts
from fspo.sim import corpus, get_domain
from fspo.sim.corpus import author_examples, favourite_answer, preference_examples, task_prompt


class Scorer:
    """Summed log-probs of a continuation, and next-token probabilities, under one model."""

    def __init__(self, model_dir: Path):
        self.tok = load_tokenizer(model_dir)
        self.model = load_model(model_dir).eval()

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logp(self, prefix: str, continuation: str) -> float:
        a, b = self._ids(prefix), self._ids(prefix + continuation)
        if b[: len(a)] != a:  # the prefix's last token merged with the continuation: score the tail
            raise ValueError(f"prefix {prefix[-20:]!r} does not tokenize as a prefix")
        logits = self.model(torch.tensor([b])).logits[0, len(a) - 1 : -1].log_softmax(-1)
        return float(logits.gather(-1, torch.tensor(b[len(a) :])[:, None]).sum())

    @torch.no_grad()
    def p_next(self, prefix: str, token: str) -> float:
        logits = self.model(torch.tensor([self._ids(prefix)])).logits[0, -1]
        return float(logits.softmax(-1)[self.tok.convert_tokens_to_ids(token)])


def format_said(description: str) -> str:
    """What a description says about the answer's format: bullets, prose, or neither."""
    return (
        "bullets"
        if "bullet points" in description
        else "prose"
        if "plain prose" in description
        else "neither"
    )


def p_bullet(scorer: Scorer, seed: int, n: int = 300) -> dict[str, float]:
    """P(first answer token is "-") after held-out described documents, by what the description says."""
    docs = corpus(
        "roleplay", seed=seed, n=n, descriptions=0.0, consistent=1.0, consistent_answers=1, described=1.0
    )
    by_kind: dict[str, list[float]] = {"bullets": [], "prose": [], "neither": []}
    for doc in docs:
        prefix = doc.split(RESPONSE)[0] + RESPONSE
        by_kind[format_said(doc.split(DESCRIPTION)[1])].append(scorer.p_next(prefix, "-"))
    return {k: round(float(np.mean(v)), 3) for k, v in by_kind.items() if v}


def oracle_p_bullet(scorer: Scorer, episodes_dir: Path, n: int = 150) -> dict[str, float]:
    """P("-") where the oracle starts answering (true description in the prompt, no shots)."""
    episodes = load_episodes(episodes_dir, "test_unseen")[:n]
    options = TemplateOptions(description=DescriptionMode.PROMPT)
    by_kind: dict[str, list[float]] = {"bullets": [], "prose": [], "neither": []}
    for ep in episodes:
        prompt = render_context([], ep.query.question, options, ep.description) + PREFERRED
        by_kind[format_said(ep.description or "")].append(scorer.p_next(prompt, "-"))
    return {k: round(float(np.mean(v)), 3) for k, v in by_kind.items() if v}


def effects(scorer: Scorer, seed: int, n: int = 200) -> dict[str, float]:
    """Shares of cases where a description / three examples move the model towards a persona's best answer."""
    dom = get_domain("roleplay")
    questions = dom.questions()
    rng = random.Random(seed)
    style, described = [], []
    while len(style) < n:
        persona = dom.sample_persona(rng, lambda _traits: 1.0)
        if dom.split(persona.traits) != "train":
            continue
        picks = []
        for _ in range(3):
            qi = rng.randrange(len(questions))
            picks.append(
                (questions[qi], favourite_answer(dom, persona.traits, questions[qi], dom.answers(qi, rng)))
            )
        qi = rng.randrange(len(questions))
        pool = dom.answers(qi, rng)
        scores = dom.score(persona.traits, dom.features(questions[qi], pool))
        if scores.max() - scores.min() < 0.5:
            continue
        best, worst = pool[int(scores.argmax())], pool[int(scores.argmin())]

        def margin(prefix: str, best: str = best, worst: str = worst) -> float:
            return scorer.logp(prefix, best) - scorer.logp(prefix, worst)

        ask = f"{QUESTION}{questions[qi]}\n{RESPONSE}"
        style.append(margin(author_examples(picks) + "# Example 4\n" + ask) > margin("# Example 1\n" + ask))
        zero = f"{TASK}{TASK_ZERO_SHOT}\n{QUESTION}{questions[qi]}\n"
        with_description = zero + f"{DESCRIPTION}{dom.describe(persona.traits)}\n{RESPONSE}"
        described.append(margin(with_description) > margin(zero + RESPONSE))
    return {"description_effect": float(np.mean(described)), "style_effect": float(np.mean(style)), "n": n}


def copy_effects(scorer: Scorer, seed: int, n: int = 200) -> dict[str, Any]:
    """Does the model continue the fixed style of three examples (`Domain.writer`)?

    ``copy_effect``: share of cases where the three examples move ``lp(answer in the writer's
    style) - lp(answer in another random style)`` towards the writer's (0.5 = nothing);
    ``p_bullet_examples``: P("-") for the fourth answer after three bulleted vs three prose examples;
    ``p_bullet_preferred``: the same in the preference layout (each example's writer answer as the
    preferred one, an answer in another style as the dispreferred one: ``contrast`` writer documents);
    ``p_bullet_task``: the same with the fourth question in the few-shot task block, where an FSPO
    prompt without dispreferred answers asks for the answer (``task`` writer documents).
    """
    dom = get_domain("roleplay")
    questions = dom.questions()
    rng = random.Random(seed)
    moved = []
    p_after, p_preferred, p_task = ({"bullets": [], "prose": []} for _ in range(3))
    for _ in range(n):
        write, other = dom.writer(rng), dom.writer(rng)
        picks = [(questions[qi], write(qi), other(qi)) for qi in rng.sample(range(len(questions)), 3)]
        qi = rng.randrange(len(questions))
        same, different = write(qi), other(qi)
        ask = f"{QUESTION}{questions[qi]}\n{RESPONSE}"
        shots = [(q, a) for q, a, _ in picks]
        prefix = author_examples(shots) + "# Example 4\n" + ask

        def margin(context: str, a: str = same, b: str = different) -> float:
            return scorer.logp(context, a) - scorer.logp(context, b)

        moved.append(margin(prefix) > margin("# Example 1\n" + ask))
        kind = "bullets" if picks[0][1].startswith("- ") else "prose"
        p_after[kind].append(scorer.p_next(prefix, "-"))
        contrast = preference_examples(picks) + f"# Example 4\n{QUESTION}{questions[qi]}\n{PREFERRED}"
        p_preferred[kind].append(scorer.p_next(contrast, "-"))
        p_task[kind].append(scorer.p_next(task_prompt(shots, questions[qi]), "-"))
    return {
        "copy_effect": float(np.mean(moved)),
        "p_bullet_examples": {k: round(float(np.mean(v)), 3) for k, v in p_after.items() if v},
        "p_bullet_preferred": {k: round(float(np.mean(v)), 3) for k, v in p_preferred.items() if v},
        "p_bullet_task": {k: round(float(np.mean(v)), 3) for k, v in p_task.items() if v},
    }


def episode_shot_effect(
    scorer: Scorer, episodes_dir: Path, n: int = 200, users: Path | None = None
) -> dict[str, dict[str, float]]:
    """Do the user's shots move the (untuned) model towards the user's choice on FSPO episodes?

    Per split and template layout (with and without dispreferred answers), the share of the first
    `n` episodes where ``[lp(c|shots) - lp(r|shots)] - [lp(c|0) - lp(r|0)] > 0`` (0.5 = the shots
    do nothing), and the log-prob accuracy with shots: what a pretrained model's copying is worth
    before any FSPO training (`icl_probe.py` measures it after SFT). With the simulation's `users`
    file, also per trait of one-trait users (``.../trait=format``): which kinds of trait are read.
    """
    trait_of = {}
    if users is not None:
        trait_of = {u.user_id: "+".join(u.metadata["traits"]) for u in read_records(users, User)}
    out: dict[str, dict[str, float]] = {}
    for split in ("test_unseen", "test_seen"):
        episodes = load_episodes(episodes_dir, split)[:n]
        for dispreferred in (False, True):
            options = TemplateOptions(include_dispreferred=dispreferred)
            heading = PREFERRED if dispreferred else RESPONSE
            effect, correct, groups = [], [], []
            for ep in episodes:
                q = ep.query
                margins = []
                for shots in (ep.shots, []):
                    context = render_context(shots, q.question, options) + heading
                    margins.append(
                        scorer.logp(context, q.chosen.strip() + "\n")
                        - scorer.logp(context, q.rejected.strip() + "\n")
                    )
                effect.append(margins[0] > margins[1])
                correct.append(margins[0] > 0)
                groups.append(trait_of.get(ep.user_id, ""))
            key = f"{split}/{'with' if dispreferred else 'without'}_dispreferred"
            for group in ["", *sorted(set(groups) - {""})]:
                rows = [i for i, g in enumerate(groups) if not group or g == group]
                out[key + (f"/trait={group}" if group else "")] = {
                    "shot_effect": round(float(np.mean([effect[i] for i in rows])), 3),
                    "logp_accuracy": round(float(np.mean([correct[i] for i in rows])), 3),
                    "n": len(rows),
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="folder for the pretrained model (not with --probe)")
    ap.add_argument("--sim", type=Path, default=Path("runs/quickstart/sim"), help="for --template-docs")
    ap.add_argument("--size", default="medium")
    ap.add_argument(
        "--docs", dest="corpus_docs", type=int, default=20_000, help="corpus documents (before template ones)"
    )
    ap.add_argument("--consistent", dest="corpus_consistent", type=float, default=0.8)
    ap.add_argument(
        "--answers", dest="corpus_consistent_answers", type=int, default=1, help="answers per author document"
    )
    ap.add_argument("--described", dest="corpus_described", type=float, default=1.0)
    ap.add_argument(
        "--styled", dest="corpus_styled", type=float, default=0.0, help="share of writer documents"
    )
    ap.add_argument("--styled-answers", dest="corpus_styled_answers", type=int, default=4)
    ap.add_argument(
        "--styled-layout",
        dest="corpus_styled_layout",
        choices=("examples", "contrast", "task"),
        default="examples",
        help="writer documents' layout (`fspo.sim.corpus.styled_documents`)",
    )
    ap.add_argument("--template-docs", type=int, default=0, help="-1: all, 0: none, N: a random N")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", type=Path, help="measure this model folder instead of pretraining one")
    ap.add_argument("--episodes", type=Path, default=Path("runs/quickstart/episodes"), help="for --probe")
    ap.add_argument(
        "--users", type=Path, help="for --probe: the simulation's users.jsonl (figures per trait)"
    )
    args = ap.parse_args()

    if args.probe:
        scorer = Scorer(args.probe)
        result = {
            "model": str(args.probe),
            "p_bullet": p_bullet(scorer, seed=args.seed + 1000),
            "oracle_p_bullet": oracle_p_bullet(scorer, args.episodes),
            **effects(scorer, seed=123),
            **copy_effects(scorer, seed=321),
            "episodes": episode_shot_effect(scorer, args.episodes, users=args.users),
        }
        print(f"P(answer starts '-') after a description saying: {result['p_bullet']}")
        print(f"... at the oracle's position (unseen episodes, 0 shots): {result['oracle_p_bullet']}")
        print(
            f"copy effect {result['copy_effect']:.3f}, P('-') after examples: {result['p_bullet_examples']}"
            f" (preference layout: {result['p_bullet_preferred']}, task layout: {result['p_bullet_task']})"
        )
        for key, figures in result["episodes"].items():
            print(f"FSPO episodes, {key}: {figures}")
        print(json.dumps(result))
        return
    if args.work is None:
        ap.error("--work is required unless --probe is given")
    start = time.perf_counter()
    # The options' `dest`s are the profile's field names: the corpus is the quickstart's, these changed.
    fields = [f for f in vars(args) if f.startswith("corpus_")] + ["template_docs", "seed"]
    mix = load_profile("default").model_copy(update={f: getattr(args, f) for f in fields})
    texts = pretraining_texts(mix, args.sim)  # exactly the quickstart's `model` stage corpus
    model_dir = init_model(args.work / "model", texts, size=args.size, seed=args.seed)
    summary: dict[str, Any] = pretrain(
        model_dir,
        texts,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        seed=args.seed,
    )
    pretrain_s = time.perf_counter() - start
    scorer = Scorer(model_dir)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "documents": len(texts),
        "final_loss": round(summary["final_loss"], 3),
        "p_bullet": p_bullet(scorer, seed=args.seed + 1000),
        **effects(scorer, seed=123),
        **copy_effects(scorer, seed=321),
        "pretrain_seconds": round(pretrain_s),
    }
    print(f"P(answer starts '-') after a description saying: {result['p_bullet']}")
    print(f"description effect {result['description_effect']:.3f}, style effect {result['style_effect']:.3f}")
    print(
        f"copy effect {result['copy_effect']:.3f}, P('-') after examples: {result['p_bullet_examples']}"
        f" (task layout: {result['p_bullet_task']})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
