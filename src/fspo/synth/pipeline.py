"""`fspo synth run`: traits -> personas -> questions -> answers -> labels -> export.

Each stage reads the previous stages' files and writes its own folder under the output directory
(a `fspo.core.stages.Stage`). A stage turns a deterministic sequence of *items* (a persona index, a
question, a (user, pair)) into exactly one line each, appended in item order (`run_ordered`) to its
log, so after a kill the log is a prefix: a resume skips the items it holds. Items that were in
flight at the kill are redone, but the responses they had already received come from the request
cache, so no finished request is sent twice, and a resumed run writes the very same files as an
uninterrupted one.

Only the labels stage grows with the dataset (users x pairs, 10^6 lines and more): it streams its
items from a generator and its lines to disk. Personas, questions and answers (thousands to tens of
thousands) are read into memory where needed.

Randomness (which traits a persona gets, which pairs a user labels, which answer is shown first) is
drawn from `random.Random(f"{seed}:{purpose}:{id}")`, so it depends on the config alone, never on
timing or on where a previous run stopped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fspo.core.files import AppendLog, atomic_open, atomic_write_json, atomic_write_text
from fspo.core.outputs import OutputFolder
from fspo.core.rng import seeded_rng
from fspo.core.stages import Stage, fingerprint, run_ordered
from fspo.llm import LETTER_SCORES, LLMClient, ParseFailure, RequestCache, ask_both_orders, make_backend
from fspo.synth.config import SynthConfig, TraitDimension
from fspo.synth.export import export_dataset
from fspo.synth.parsing import (
    AnswerReply,
    CheckReply,
    DescriptionReply,
    JudgeReply,
    QuestionsReply,
    TraitsReply,
    ViewpointsReply,
)
from fspo.synth.prompts import PromptTemplate, ask_prompt, load_prompts

STAGES = ("traits", "personas", "questions", "answers", "labels", "export")


def _fp(*parts: Any) -> str:
    return fingerprint(parts)


def normalize_question(text: str) -> str:
    """The de-duplication key: case, punctuation and spacing do not make a new question."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


@dataclass
class Pipeline:
    cfg: SynthConfig
    out: Path
    progress: bool = True
    client: LLMClient | None = None
    prompts: dict[str, PromptTemplate] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    _fps: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompts = self.prompts or load_prompts(self.cfg.prompts_dir)
        self.window = max(4 * self.cfg.backend.max_concurrency, 2 * self.cfg.backend.batch_size, 16)

    # -- plumbing ------------------------------------------------------------------------------
    def _stage(self, name: str, section: Any, prompts: tuple[str, ...], upstream: tuple[str, ...]) -> Stage:
        model = self.cfg.backend.model or ""
        fp = _fp(
            name,
            section,
            self.cfg.seed,
            model,
            self.cfg.backend.generation_params(),
            [self.prompts[p].digest() for p in (*prompts, "reask")],
            [self._fps[u] for u in upstream],
        )
        self._fps[name] = fp
        return Stage(self.out, name, fp, depends=upstream)

    def _cached(self, stage: Stage) -> bool:
        """True (its summary recorded) if `stage` finished with these inputs; else ready it to run."""
        if (done := stage.done()) is not None:
            self.summaries[stage.name] = done["summary"]
            return True
        stage.begin()
        return False

    async def _ask(self, prompt: str, schema: Any, **kwargs: Any) -> Any:
        assert self.client is not None
        return await ask_prompt(self.client, self.prompts, prompt, schema, **kwargs)

    def _bar(self, name: str, total: int, initial: int) -> tqdm:
        return tqdm(
            total=total,
            initial=initial,
            desc=f"{name:9s}",
            unit="item",
            disable=not self.progress,
            dynamic_ncols=True,
            smoothing=0.05,
        )

    def _postfix(self, bar: tqdm) -> None:
        assert self.client is not None
        s = self.client.stats
        bar.set_postfix(
            req=s.sent,
            cached=s.cache_hits,
            retry=sum(s.retries.values()),
            tok=s.prompt_tokens + s.completion_tokens,
            cost=f"{s.cost:.3f}",
            refresh=False,
        )

    async def _stream(
        self, stage: Stage, filename: str, items: Iterator[Any], total: int, work: Any
    ) -> Counter:
        """Run one streaming stage to the end; returns the count of each item `status`."""
        log, done = stage.open_log(filename)
        counts: Counter[str] = Counter(rec["status"] for rec in log.read())
        bar = self._bar(stage.name, total, done)

        def emit(rec: dict[str, Any]) -> None:
            log.append(rec)
            counts[rec["status"]] += 1
            bar.update(1)
            self._postfix(bar)

        try:
            await run_ordered(itertools.islice(items, done, None), work, emit, self.window)
        finally:
            bar.close()
            log.close()
        return counts

    # -- stages --------------------------------------------------------------------------------
    async def traits(self) -> list[TraitDimension]:
        tc = self.cfg.traits
        stage = self._stage("traits", tc.model_dump(), ("traits_propose",), ())
        path = stage.path / "traits.json"
        if self._cached(stage):
            return [TraitDimension.model_validate(t) for t in json.loads(path.read_text())]
        dims = list(tc.given)
        status = "given"
        if tc.propose:
            known = {d.name.lower() for d in dims}

            def check(r: TraitsReply) -> str | None:
                new = [t for t in r.traits if t.name.lower() not in known]
                return None if len(new) >= tc.propose else f"give {tc.propose} new dimensions, not {len(new)}"

            try:
                reply = await self._ask(
                    "traits_propose",
                    TraitsReply,
                    check=check,
                    domain=self.cfg.domain,
                    n=tc.propose,
                    values=tc.values_per_dimension,
                    existing=", ".join(d.name for d in dims) or "none",
                )
                dims += [t for t in reply.traits if t.name.lower() not in known][: tc.propose]
                status = "proposed"
            except ParseFailure:
                status = "propose_failed"
        atomic_write_json(path, [d.model_dump() for d in dims])
        self.summaries["traits"] = stage.finish({"dimensions": len(dims), "status": status})
        return dims

    def _persona_traits(self, dims: list[TraitDimension], i: int) -> dict[str, str]:
        rng = seeded_rng(self.cfg.seed, "persona", i)
        k = self.cfg.personas.traits_per_persona or len(dims)
        chosen = rng.sample(dims, min(k, len(dims)))
        return {d.name: rng.choice(d.values) for d in chosen}

    async def personas(self, dims: list[TraitDimension]) -> None:
        pc = self.cfg.personas
        stage = self._stage(
            "personas", pc.model_dump(), ("persona_seed", "persona_check", "persona_extend"), ("traits",)
        )
        if self._cached(stage):
            return
        domain = self.cfg.domain

        async def work(i: int) -> dict[str, Any]:
            user_id = f"user{i:05d}"
            traits = self._persona_traits(dims, i)
            rec: dict[str, Any] = {"user_id": user_id, "traits": traits, "rounds": 0, "specific": False}
            listing = "\n".join(f"- {k}: {v}" for k, v in traits.items())
            try:
                desc = (
                    await self._ask(
                        "persona_seed", DescriptionReply, sample=user_id, domain=domain, traits=listing
                    )
                ).description
            except ParseFailure as err:
                return {**rec, "status": "failed", "error": str(err)}
            history = [desc]
            for r in range(pc.max_refine_rounds + 1):
                try:
                    verdict = await self._ask(
                        "persona_check", CheckReply, sample=user_id, domain=domain, persona=desc
                    )
                except ParseFailure as err:
                    rec["refine_error"] = str(err)
                    break
                if verdict.specific:
                    rec["specific"] = True
                    break
                if r == pc.max_refine_rounds:
                    break
                try:
                    desc = (
                        await self._ask(
                            "persona_extend",
                            DescriptionReply,
                            sample=user_id,
                            domain=domain,
                            persona=desc,
                            missing=verdict.missing or "concrete preferences",
                        )
                    ).description
                except ParseFailure as err:
                    rec["refine_error"] = str(err)
                    break
                history.append(desc)
                rec["rounds"] = r + 1
            return {**rec, "description": desc, "history": history, "status": "ok"}

        counts = await self._stream(stage, "personas.jsonl", iter(range(pc.count)), pc.count, work)
        self.summaries["personas"] = stage.finish({"items": pc.count, "status": dict(counts)})

    async def questions(self) -> None:
        qc = self.cfg.questions
        stage = self._stage("questions", qc.model_dump(), ("questions",), ())
        if self._cached(stage):
            return
        domains = {d.name: d for d in qc.domains}
        batches = [(d.name, b) for d in qc.domains for b in range(math.ceil(d.generate / d.per_request))]

        async def work(item: tuple[str, int]) -> dict[str, Any]:
            d = domains[item[0]]
            try:
                reply = await self._ask(
                    "questions",
                    QuestionsReply,
                    sample=f"{d.name}:{item[1]}",
                    domain_name=d.name,
                    domain_description=d.description,
                    n=d.per_request,
                    batch=item[1] + 1,
                )
                return {"domain": d.name, "batch": item[1], "questions": reply.questions, "status": "ok"}
            except ParseFailure as err:
                return {
                    "domain": d.name,
                    "batch": item[1],
                    "questions": [],
                    "status": "failed",
                    "error": str(err),
                }

        counts = await self._stream(stage, "batches.jsonl", iter(batches), len(batches), work)
        # Gather: given questions first, then generated ones in batch order; drop duplicates.
        seen: set[str] = set()
        taken: Counter[str] = Counter()
        rows, dups = [], 0
        generated: dict[str, list[str]] = {d.name: [] for d in qc.domains}
        for rec in AppendLog(stage.path / "batches.jsonl").read():
            generated[rec["domain"]].extend(rec["questions"])
        for d in qc.domains:
            for source, texts in (("given", d.questions), ("generated", generated[d.name])):
                for text in texts:
                    key = normalize_question(text)
                    if not key:
                        continue
                    if key in seen:
                        dups += 1
                        continue
                    if source == "generated" and taken[d.name] >= d.generate:
                        continue
                    seen.add(key)
                    if source == "generated":
                        taken[d.name] += 1
                    rows.append(
                        {
                            "question_id": f"q{len(rows):06d}",
                            "domain": d.name,
                            "question": text.strip(),
                            "source": source,
                        }
                    )
        with atomic_open(stage.path / "questions.jsonl") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.summaries["questions"] = stage.finish(
            {"questions": len(rows), "duplicates_dropped": dups, "batches": dict(counts)}
        )

    def _read_questions(self) -> list[dict[str, Any]]:
        return list(AppendLog(self.out / "questions" / "questions.jsonl").read())

    async def answers(self) -> None:
        ac = self.cfg.answers
        stage = self._stage("answers", ac.model_dump(), ("viewpoints", "answer"), ("questions",))
        if self._cached(stage):
            return
        questions = self._read_questions()
        v = ac.views_per_question

        def enough(r: ViewpointsReply) -> str | None:
            return None if len(r.viewpoints) >= v else f"give {v} viewpoints, not {len(r.viewpoints)}"

        async def one_answer(q: dict[str, Any], view: str, j: int) -> str | None:
            try:
                return (
                    await self._ask(
                        "answer",
                        AnswerReply,
                        sample=f"{q['question_id']}:{j}",
                        question=q["question"],
                        viewpoint=view,
                    )
                ).answer
            except ParseFailure:
                return None

        async def work(q: dict[str, Any]) -> dict[str, Any]:
            rec = {"question_id": q["question_id"]}
            try:
                views = (
                    await self._ask(
                        "viewpoints",
                        ViewpointsReply,
                        check=enough,
                        sample=q["question_id"],
                        question=q["question"],
                        n=v,
                    )
                ).viewpoints[:v]
            except ParseFailure as err:
                return {**rec, "viewpoints": [], "answers": [], "status": "failed", "error": str(err)}
            answers = await asyncio.gather(*(one_answer(q, view, j) for j, view in enumerate(views)))
            usable = [a for a in answers if a is not None]
            distinct = len({a.strip() for a in usable})
            status = "ok" if distinct == len(views) else ("partial" if distinct >= 2 else "failed")
            return {**rec, "viewpoints": views, "answers": list(answers), "status": status}

        counts = await self._stream(stage, "answers.jsonl", iter(questions), len(questions), work)
        self.summaries["answers"] = stage.finish({"items": len(questions), "status": dict(counts)})

    def _label_items(
        self, users: list[str], pool: list[tuple[int, int, int]]
    ) -> Iterator[tuple[str, int, int, int, bool]]:
        k = min(self.cfg.labels.per_user, len(pool))
        for user in users:
            rng = seeded_rng(self.cfg.seed, "labels", user)
            for p in rng.sample(range(len(pool)), k):
                q, i, j = pool[p]
                yield user, q, i, j, rng.random() < 0.5

    def _pair_pool(self, answers: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
        pool = []
        for qi, rec in enumerate(answers):
            if rec["status"] == "failed":
                continue
            ans = rec["answers"]
            for i, j in itertools.combinations(range(len(ans)), 2):
                if ans[i] is not None and ans[j] is not None and ans[i].strip() != ans[j].strip():
                    pool.append((qi, i, j))
        seeded_rng(self.cfg.seed, "pool").shuffle(pool)
        return pool[: self.cfg.labels.pair_pool] if self.cfg.labels.pair_pool else pool

    async def labels(self) -> None:
        lc = self.cfg.labels
        stage = self._stage("labels", lc.model_dump(), ("judge",), ("personas", "answers"))
        if self._cached(stage):
            return
        personas = {
            p["user_id"]: p["description"]
            for p in AppendLog(self.out / "personas" / "personas.jsonl").read()
            if p["status"] == "ok"
        }
        questions = {q["question_id"]: q["question"] for q in self._read_questions()}
        answers = list(AppendLog(self.out / "answers" / "answers.jsonl").read())
        pool = self._pair_pool(answers)
        users = sorted(personas)
        total = len(users) * min(lc.per_user, len(pool))

        async def judge(user: str, question: str, a: str, b: str, order: str) -> float | None:
            try:
                reply = await self._ask(
                    "judge",
                    JudgeReply,
                    sample=f"{user}:{order}",
                    persona=personas[user],
                    question=question,
                    answer_a=a,
                    answer_b=b,
                )
            except ParseFailure:
                return None
            return LETTER_SCORES[reply.preferred]

        async def work(item: tuple[str, int, int, int, bool]) -> dict[str, Any]:
            user, qi, i, j, swap = item
            if swap:
                i, j = j, i
            rec = answers[qi]
            question = questions[rec["question_id"]]
            a, b = rec["answers"][i], rec["answers"][j]
            pair = await ask_both_orders(lambda x, y, order: judge(user, question, x, y, order), a, b)
            first, second = pair.letters()
            out = {
                "user_id": user,
                "question_id": rec["question_id"],
                "views": [i, j],
                "first": first,
                "second": second,
            }
            if not pair.answered:
                return {**out, "status": "failed"}
            if pair.winner is None:  # the verdict followed the position, not the answer
                return {**out, "status": "inconsistent"}
            return {**out, "winner": i if pair.winner == "a" else j, "status": "consistent"}

        counts = await self._stream(stage, "labels.jsonl", self._label_items(users, pool), total, work)
        self.summaries["labels"] = stage.finish(
            {"items": total, "users": len(users), "pair_pool": len(pool), "status": dict(counts)}
        )

    def export(self, dims: list[TraitDimension], usage: dict[str, dict[str, float]]) -> None:
        """users.jsonl + preferences.jsonl (the core records) and the dataset card."""
        assert self.client is not None
        stage = self._stage("export", {}, (), ("labels",))
        if self._cached(stage):
            return
        stages = {k: v for k, v in self.summaries.items() if k != "export"}
        client = self.client.stats.as_dict()
        summary = export_dataset(self.out, self.cfg, dims, self.prompts, stages, usage, client)
        self.summaries["export"] = stage.finish(summary)

    # -- whole run -----------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        cache = RequestCache(self.out / "cache.sqlite")
        if self.client is None:
            self.client = LLMClient(make_backend(self.cfg.backend), self.cfg.backend, cache)
        else:
            self.client.cache = cache
        runs = AppendLog(self.out / "runs.jsonl")
        outcome = "interrupted"
        try:
            dims = await self.traits()
            await self.personas(dims)
            await self.questions()
            await self.answers()
            await self.labels()
            self.export(dims, cache.usage_by_stage())
            outcome = "finished"
        except BaseException as err:
            outcome = f"stopped: {type(err).__name__}: {err}"
            raise
        finally:
            runs.append({"outcome": outcome, "client": self.client.stats.as_dict()})
            runs.close()
            await self.client.aclose()
            cache.close()
        return {"out": str(self.out), "stages": self.summaries, "client": self.client.stats.as_dict()}


def run_pipeline(
    cfg: SynthConfig,
    out: str | Path | None = None,
    progress: bool = True,
    config_path: str | Path | None = None,
    client: LLMClient | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the per-stage summaries and this run's client counters.

    An `out` holding a run of other settings is refused unless `overwrite` (`fspo.core.outputs`);
    then each stage's own cache redoes only the stages whose settings changed, from `cache.sqlite`.
    """
    folder = Path(out or cfg.out)
    params = cfg.model_dump(mode="json", exclude={"out"})
    output = OutputFolder(
        folder, "synth run", params, OUTPUTS, overwrite=overwrite, resumable=True, cached_stages=True
    )
    with output.writing():
        if config_path is not None:
            atomic_write_text(folder / "config.yaml", Path(config_path).read_text(encoding="utf-8"))
        pipe = Pipeline(cfg, folder, progress=progress, client=client)
        return asyncio.run(pipe.run())


# What a run writes in its folder: the stages' folders, the records, the card and the request cache.
OUTPUTS = (
    *STAGES,
    "config.yaml",
    "runs.jsonl",
    "cache.sqlite*",
    "users.jsonl",
    "preferences.jsonl",
    "card.json",
    "README.md",
    "stats.json",
)
