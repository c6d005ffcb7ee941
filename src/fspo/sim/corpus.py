"""Plain text of a domain for pre-training the embedded small language model.

Why a separate corpus: the default model is trained from scratch on CPU in minutes, so it must
first learn the domain's tiny language (questions, answers in every style, user descriptions)
before it can learn preferences over it. Drawing fresh answer pools round after round gives far
more distinct texts than one simulation's pools, from the same sentence templates.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from fspo.core.errors import UserError
from fspo.sim.registry import get_domain

StyledLayout = Literal["examples", "contrast", "task"]


def corpus(
    domain: str,
    seed: int = 0,
    n: int = 10_000,
    descriptions: float = 0.1,
    consistent: float = 0.0,
    consistent_answers: int = 4,
    described: float = 0.0,
    styled: float = 0.0,
    styled_answers: int = 4,
    styled_layout: StyledLayout = "examples",
    **options: Any,
) -> list[str]:
    """`n` documents: mostly ``question + "\\n" + answer``, plus a share of user descriptions.

    Deterministic for a seed. `descriptions` is the share of documents that are persona
    descriptions (what RAT teaches the model to write). `consistent` is the share of
    *author-consistent* documents (see `consistent_documents`), and `described` the share of those
    that also carry the author's description (see `described_document`). `styled` is the share of
    *writer* documents (see `styled_documents`), `styled_answers` answers each, in `styled_layout`.
    """
    if n < 0:
        raise UserError(f"corpus size must be >= 0, got {n}")
    if not 0 <= descriptions <= 1:
        raise UserError(f"descriptions must be a share in [0, 1], got {descriptions}")
    dom = get_domain(domain, **options)
    rng = random.Random(seed)
    questions = dom.questions()
    if not 0 <= consistent <= 1 - descriptions:
        raise UserError(f"consistent must be a share in [0, 1 - descriptions], got {consistent}")
    if not 0 <= styled <= 1 - descriptions - consistent + 1e-9:  # shares that sum to 1 in decimal
        raise UserError(f"styled must be a share in [0, 1 - descriptions - consistent], got {styled}")
    if styled_answers < 1:
        raise UserError(f"styled_answers must be >= 1, got {styled_answers}")
    if not 0 <= described <= 1:
        raise UserError(f"described must be a share in [0, 1], got {described}")
    n_desc = round(n * descriptions)
    docs = consistent_documents(dom, round(n * consistent), consistent_answers, rng, described)
    if styled:  # nothing drawn at 0, so corpora without writer documents keep their random stream
        docs += styled_documents(dom, round(n * styled), styled_answers, rng, styled_layout)
    docs += [dom.describe(dom.sample_persona(rng, lambda _traits: 1.0).traits) for _ in range(n_desc)]
    while len(docs) < n:  # the rest: single question/answer documents
        order = list(range(len(questions)))
        rng.shuffle(order)
        for qi in order:
            for answer in dom.answers(qi, rng):
                docs.append(f"{questions[qi]}\n{answer}")
            if len(docs) >= n:
                break
    docs = docs[:n]
    rng.shuffle(docs)
    return docs


def consistent_documents(
    dom: Any, n: int, answers: int, rng: random.Random, described: float = 0.0
) -> list[str]:
    """`n` documents of `answers` answers each, all written by one "author" with a consistent taste.

    Why: the paper starts from a pretrained instruct model, which can already continue a text in
    the style of the examples it was shown. Our from-scratch model only gets that ability from text
    where style is consistent within a document, as it is in real corpora (one author, one voice).
    Each author is a freshly drawn persona restricted to *training* trait combinations (so test
    users' combinations stay unseen), and picks, for random questions, the answer of the question's
    pool it likes best. Documents use the template's shot layout without dispreferred answers
    (``# Example i`` / ``## Question`` / ``## Response``); there are no users, pairs or labels.
    A share `described` of them is a `described_document` instead.
    """
    questions = dom.questions()
    docs: list[str] = []
    while len(docs) < n:
        persona = dom.sample_persona(rng, lambda _traits: 1.0)
        if dom.split(persona.traits) == "test":  # None (held out by user): any persona may write
            continue
        picks = []
        for _ in range(answers):
            qi = rng.randrange(len(questions))
            picks.append(
                (questions[qi], favourite_answer(dom, persona.traits, questions[qi], dom.answers(qi, rng)))
            )
        if described and rng.random() < described:  # nothing drawn at 0: the random stream stays the same
            docs.append(described_document(dom.describe(persona.traits), picks, rng))
        else:
            docs.append(author_examples(picks))
    return docs


def styled_documents(
    dom: Any, n: int, answers: int, rng: random.Random, layout: StyledLayout = "examples"
) -> list[str]:
    """`n` documents of `answers` answers each, all in one writer's fixed style (`Domain.writer`).

    Why: FSPO needs a model that continues the style of the answers in its context, as a
    pretrained instruct model does. Author documents (`consistent_documents`) do not teach it:
    a persona's favourite answers agree on a given feature only loosely, so copying barely pays
    (docs/research/pretraining-mix.md). Here every feature agrees across the document, the strongest
    incentive there is. Layouts (`StyledLayout`):

    * ``examples``: the template's shots without dispreferred answers (``# Example i``);
    * ``contrast``: its preference layout, the writer's answer as the preferred one and an answer in
      a fresh random style as the dispreferred one, so what to copy is the *difference*;
    * ``task``: the shots, then the last answer in the template's few-shot task block (``# Task``,
      `task_prompt`), exactly where an FSPO prompt without dispreferred answers asks for the answer.
      A copier learned only in the ``examples`` layout does not copy there.

    No leak of the simulated population: styles are uniform over every combination (the test
    users' held-out ones included, as any real corpus would have them), and nothing here says
    which combinations users hold, so a zero-shot model learns nothing about the population.
    """
    questions = dom.questions()
    docs = []
    for _ in range(n):
        write = dom.writer(rng)
        picks = []
        for _ in range(answers):
            qi = rng.randrange(len(questions))
            picks.append((questions[qi], write(qi), dom.writer(rng)(qi) if layout == "contrast" else ""))
        if layout == "contrast":
            docs.append(preference_examples(picks))
        elif layout == "task":
            docs.append(task_examples([(q, a) for q, a, _ in picks]))
        else:
            docs.append(author_examples([(q, a) for q, a, _ in picks]))
    return docs


def favourite_answer(dom: Any, traits: Any, question: str, pool: list[str]) -> str:
    """The answer of `pool` that a persona with `traits` rewards most (the first one on a tie)."""
    return pool[int(dom.score(traits, dom.features(question, pool)).argmax())]


def author_examples(picks: list[tuple[str, str]]) -> str:
    """(question, answer) pairs in the template's shot layout without dispreferred answers."""
    from fspo.data.template import QUESTION, RESPONSE

    return "".join(
        f"# Example {i}\n{QUESTION}{q}\n{RESPONSE}{a}\n\n" for i, (q, a) in enumerate(picks, start=1)
    )


def task_prompt(shots: list[tuple[str, str]], question: str) -> str:
    """The FSPO prompt without dispreferred answers for (question, answer) `shots`, up to the answer.

    The task sentence follows the template's own rule (`task_sentence`), so a writer document
    reads exactly as the prompt the trained model will be given.
    """
    from fspo.data.template import QUESTION, RESPONSE, TASK, TemplateOptions, task_sentence

    sentence = task_sentence(len(shots), TemplateOptions(include_dispreferred=False))
    return author_examples(shots) + f"{TASK}{sentence}\n{QUESTION}{question}\n{RESPONSE}"


def task_examples(picks: list[tuple[str, str]]) -> str:
    """All but the last (question, answer) pair as shots, the last as the few-shot task's answer."""
    *shots, (question, answer) = picks
    return task_prompt(shots, question) + f"{answer}\n"


def preference_examples(picks: list[tuple[str, str, str]]) -> str:
    """(question, preferred, dispreferred) triples in the template's shot layout."""
    from fspo.data.template import DISPREFERRED, PREFERRED, QUESTION

    return "".join(
        f"# Example {i}\n{QUESTION}{q}\n{PREFERRED}{a}\n{DISPREFERRED}{b}\n\n"
        for i, (q, a, b) in enumerate(picks, start=1)
    )


def described_document(description: str, picks: list[tuple[str, str]], rng: random.Random) -> str:
    """Some of an author's answers as examples, then its description and one more answer, in RAT's layout.

    Why: an instruct model follows a stated preference ("answer in bullet points") and can say
    what a set of examples has in common; the oracle baseline and RAT rely on both. Our model only
    learns them from text where a description sits next to answers written to it. The layout is
    the template's RAT/oracle one (``# Task`` / ``## Question`` / ``## User Description`` /
    response), with 0 to all-but-one examples before it, so both skills appear: describing from
    examples, and answering as a description says (alone when there are no examples).
    """
    from fspo.data.template import DESCRIPTION, QUESTION, RESPONSE, TASK, TASK_RAT, TASK_ZERO_SHOT

    shown = rng.randrange(len(picks))
    question, answer = picks[shown]
    task = TASK_RAT if shown else TASK_ZERO_SHOT
    return author_examples(picks[:shown]) + (
        f"{TASK}{task}\n{QUESTION}{question}\n{DESCRIPTION}{description}\n{RESPONSE}{answer}\n"
    )
