"""On-policy FSPO: train IPO on the model's own answers, labelled by the labeller of the training data.

FSPO's implicit reward reads unseen users, but its answers need not carry what it read: the pairs it
trained on were written by someone else. On-policy FSPO closes that gap in rounds; round r:

1. samples `samples` answers from the current policy for each of `episodes_per_round` *training*
   episodes, given that user's shots (the layout the policy was trained with; seeded per episode,
   round and sample by `Decoding.row_seed`);
2. labels them with the labeller that made the training data (`fspo.train.labellers`): the
   simulator's exact reward for simulated users (``judge: exact``, read from the users file) or, for
   LLM-made users, the `fspo synth` judge prompt and endpoint of the synth config that made them
   (``judge: synth:<config.yaml>``, asked in both orders). The best and the worst answer of an episode become
   one pair (an ordinary episode: the user's shots, the query question, chosen/rejected); an episode
   whose best and worst tie is left out and counted. Only training episodes are sampled: an episode
   of another split, or a user of the held-out splits, is refused, so no unseen user ever labels;
3. trains IPO on those pairs with the one trainer (`fspo.train.trainer.train`), with a `TrainConfig`
   from `train_config("fspo", ...)` (the fspo recipe under this config's `train` overrides);
4. the trained model is round r + 1's policy.

The reference policy. The trainer's reference is the model a run starts from, so round r's
reference is the policy that sampled round r's answers: iterative (online) IPO, where the pairs are
drawn from the reference, as IPO's analysis assumes (Azar et al. 2023, arXiv 2310.12036; the online
variant: Calandriello et al. 2024, arXiv 2403.08635). Each round pulls its pairs' log-ratio margins
toward 1/(2β) measured from the previous round's policy, so the policy may move further from the
SFT model with every round. The alternative, a fixed SFT reference across rounds (the
pairs then come from a policy other than the reference), is not offered: the trainer takes its
reference from its starting model, and a separate reference model would be a trainer option.

Checking that a rise is not reward gaming. Each round's record (``round-<r>/round.json``, and all
rounds in ``summary.json``) holds, over that round's samples: the labeller's mean reward, the
answers' mean length in words, the share of degenerate answers (`fspo.infer.loops.repetition_loop`),
for simulated users the mean relevance to the question and the share of the user's trait values the
answers carry (`Domain.carried`), and example pairs. A reward that rises while relevance falls, the
length runs to the token budget or the loop share grows is the labeller being gamed, not the user
being served; read the examples, and ``round-<r>/samples.jsonl`` for every answer and its score.
Measure each round on unseen users by the training run's held-out evaluation (``train.eval_episodes``:
implicit-reward accuracy) and by generating with ``round-<r>/train/model``.

Files, under ``out``: ``round-<r>/samples.jsonl`` (an append log: a settings line, then one line per
episode with its answers and their scores; a killed run resumes it byte-identical, since each batch
is planned over all of the round's episodes and each row draws from its own seed), ``pairs.jsonl``,
``train/`` (the round's training run, which the trainer resumes from its checkpoints) and
``round.json``, written last: a round that has it is skipped on rerun. ``model/`` is a copy of the
last round's model; ``onpolicy_config.json`` the run's config (``--config`` reads it back). More
rounds continue a finished run: `rounds` is not part of what identifies it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fspo.core.errors import DataError, UserError
from fspo.core.files import AppendLog, atomic_write_json, read_fields
from fspo.core.outputs import OutputFolder
from fspo.core.rng import seeded_rng
from fspo.data.episodes import load_episodes
from fspo.data.io import find_data_file, read_unique_records, write_records
from fspo.data.schema import Episode, Preference, User
from fspo.data.template import DescriptionMode, parse_generation
from fspo.infer.generate import Decoding, Mode, generate_batch, prompt_ids
from fspo.infer.layout import trained_layout
from fspo.infer.loops import repetition_loop
from fspo.train.checkpoint import latest_checkpoint
from fspo.train.config import TrainConfig, train_config
from fspo.train.labellers import JUDGE_CACHE, Labeller, make_labeller

CONFIG_FILE = "onpolicy_config.json"
SUMMARY_FILE = "summary.json"
ROUND_FILE = "round.json"
SAMPLES_FILE = "samples.jsonl"
PAIRS_FILE = "pairs.jsonl"
MODEL_DIR = "model"
# TrainConfig fields each round sets itself: the `train` overrides may not.
SET_BY_ROUND = ("stage", "model", "episodes", "out")
EXAMPLES = 3  # example pairs kept in each round's record


class OnPolicyConfig(BaseModel):
    """The settings of an on-policy run: the one home of their defaults, for `run_onpolicy` and the
    flags of `fspo train onpolicy`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="the starting policy (e.g. an FSPO model folder); round 0 samples it")
    episodes: str = Field(..., description="training episodes: a JSONL file or an episodes folder (train)")
    users: str = Field(..., description="users file or data folder: the labeller's users (sim metadata)")
    out: str = Field("runs/onpolicy", description="output folder: round-<r>/, summary.json, model/")
    rounds: int = Field(2, ge=1, description="rounds of sample, label, train")
    episodes_per_round: int = Field(64, ge=1, description="training episodes sampled per round")
    samples: int = Field(4, ge=2, description="answers sampled per episode; the best and worst make a pair")
    max_new_tokens: int = Field(64, ge=1, description="token budget of one sampled answer")
    batch_size: int = Field(8, ge=1, description="episodes per generation batch (each gives `samples` rows)")
    decoding: Decoding = Field(
        default_factory=lambda: Decoding(temperature=1.0),
        description="how answers are sampled (temperature > 0; default temperature 1, top-p 1)",
    )
    judge: str = Field(
        "exact",
        description="the labeller: exact (simulated users' reward) or synth:<config.yaml> (the synth "
        "judge that labelled LLM-made users)",
    )
    seed: int = Field(0, description="seed of which episodes each round samples")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainConfig overrides of each round's IPO run, over the fspo recipe (max_steps, beta)",
    )

    @field_validator("decoding")
    @classmethod
    def _sampled(cls, decoding: Decoding) -> Decoding:
        if not decoding.sampled:
            raise ValueError("temperature must be > 0: greedy decoding gives every sample of a prompt alike")
        return decoding

    @field_validator("judge")
    @classmethod
    def _judge_spec(cls, judge: str) -> str:
        kind, _, arg = judge.partition(":")
        if judge == "exact" or (kind == "synth" and arg):
            return judge
        raise ValueError(f"{judge!r}: use exact or synth:<synth config.yaml>")

    @field_validator("train")
    @classmethod
    def _not_set_by_round(cls, train: dict[str, Any]) -> dict[str, Any]:
        taken = [name for name in SET_BY_ROUND if name in train]
        if taken:
            raise ValueError(
                f"{', '.join(taken)}: set by each round (stage fspo, its start model, pairs, folder)"
            )
        if train.get("rat", "none") != "none":
            raise ValueError("rat: on-policy rounds sample and train plain answers (rat none)")
        return train


def onpolicy_config(
    values: dict[str, Any], config_file: str | Path | None = None, source: str = "python"
) -> OnPolicyConfig:
    """`values` over a config file (JSON/YAML) over the defaults; `decoding` and `train` merge key by
    key (a partial decoding lies over the default sampling, temperature 1). A bad value, here or in
    the `train` overrides (validated as round 0's `TrainConfig`), is one `UserError` naming the field."""
    default_decoding = OnPolicyConfig.model_fields["decoding"].get_default(call_default_factory=True)
    merged: dict[str, Any] = {"decoding": default_decoding.model_dump()}  # a partial decoding lies over it
    for layer in (read_fields(config_file) if config_file is not None else {}, values):
        for key, value in layer.items():
            nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = {**merged[key], **value} if nested else value
    where = f"{config_file} < {source}" if config_file is not None else source
    try:
        cfg = OnPolicyConfig.model_validate(merged)
    except ValidationError as err:
        problems = "; ".join(
            f"field '{'.'.join(map(str, e['loc'])) or '(config)'}': {e['msg']}" for e in err.errors()
        )
        raise UserError(f"invalid on-policy config ({where}): {problems}") from None
    round_train_config(cfg, cfg.model, Path(cfg.out) / "round-0", progress=False)
    return cfg


def round_train_config(cfg: OnPolicyConfig, start: str, folder: Path, progress: bool) -> TrainConfig:
    """Round's IPO run: the fspo recipe < the start model's layout < `cfg.train` < what the round sets.

    The layout (shots with or without the dispreferred answer, chat wrapping) defaults to the one the
    start model was trained with, so the policy trains on prompts rendered as it sampled from them.
    """
    layout = trained_layout(start)
    if layout.description is not DescriptionMode.NONE:
        raise UserError(f"--model {start}: trained with RAT; on-policy rounds sample plain answers")
    overrides = {
        "include_dispreferred": layout.include_dispreferred,
        "chat_template": layout.chat_template,
        "progress": progress,
        **cfg.train,
        "model": start,
        "episodes": str(folder / PAIRS_FILE),
        "out": str(folder / "train"),
    }
    return train_config("fspo", overrides, source="on-policy train")


# ----------------------------------------------------------------------------------------- inputs
def read_users(path: str | Path) -> dict[str, User]:
    """The users of a users file, or of a data folder's users file, by id."""
    path = Path(path)
    file = find_data_file(path, "users") if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--users {path}: no such file")
    users, _ = read_unique_records(file, User)
    return {u.user_id: u for u in users}


def training_episodes(path: str | Path, users: dict[str, User]) -> list[Episode]:
    """The training episodes, refused if any belongs to a held-out split or user (an unseen user must
    never label), or to a user the users file lacks."""
    episodes = load_episodes(path, "train")
    if not episodes:
        raise UserError(f"--episodes {path}: no training episodes")
    held_out: set[str] = set()
    if Path(path).is_dir():
        try:
            held_out = {e.user_id for e in load_episodes(path, "test_unseen")}
        except DataError:
            raise
        except UserError:  # a folder without that split: no unseen users
            pass
    for e in episodes:
        if e.split != "train":
            raise UserError(f"--episodes {path}: episode {e.episode_id!r} is split {e.split!r}, not train")
        if e.user_id in held_out:
            raise UserError(
                f"--episodes {path}: user {e.user_id!r} of {e.episode_id!r} is a test_unseen user"
            )
        if e.user_id not in users:
            raise UserError(f"--users: no user {e.user_id!r} (of episode {e.episode_id!r})")
    return episodes


def round_episodes(episodes: Sequence[Episode], cfg: OnPolicyConfig, r: int) -> list[Episode]:
    """Round `r`'s episodes: the next `episodes_per_round` of one seeded shuffle, wrapping around, so
    rounds visit every training episode before any repeats."""
    order = list(episodes)
    seeded_rng(cfg.seed, "onpolicy-episodes").shuffle(order)
    k = min(cfg.episodes_per_round, len(order))
    start = (r * k) % len(order)
    return [order[(start + i) % len(order)] for i in range(k)]


# --------------------------------------------------------------------------------------- sampling
def _sample_settings(cfg: OnPolicyConfig, r: int, tc: TrainConfig) -> dict[str, Any]:
    return {
        "round": r,  # with the run's settings (its `fspo_run.json`), the round names its start model
        "samples": cfg.samples,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "decoding": cfg.decoding.model_dump(mode="json"),
        "judge": cfg.judge,
        "shots": tc.shots,
    }


def _read_samples(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The episodes a killed run already sampled and labelled."""
    log = AppendLog(path)  # opening cuts a torn last line
    log.close()
    records = list(log.read())
    if records and records[0].get("settings") != settings:
        raise UserError(f"{path} holds samples of other settings ({records[0].get('settings')}); remove it")
    return {rec["episode_id"]: rec for rec in records[1:]}


def sample_round(
    cfg: OnPolicyConfig, r: int, tc: TrainConfig, episodes: Sequence[Episode],
    users: dict[str, User], labeller: Labeller, log_path: Path, progress: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """Sample and label `episodes` with the round's policy (`tc.model`), appending one record per
    episode to `log_path`; returns the records in episode order. Resumes the log of a killed run."""
    from fspo.models.loading import load_model, load_tokenizer

    settings = _sample_settings(cfg, r, tc)
    done = _read_samples(log_path, settings)
    tokenizer = load_tokenizer(tc.model)
    options = tc.template_options()
    encoded = [(e, prompt_ids(e, tokenizer, Mode.PLAIN, tc.shots, options)) for e in episodes]
    batches = [encoded[i : i + cfg.batch_size] for i in range(0, len(encoded), cfg.batch_size)]
    todo = [b for b in batches if any(e.episode_id not in done for e, _ in b)]
    if todo:
        model = _policy(load_model(tc.model))
        log = AppendLog(log_path)
        try:
            if log_path.stat().st_size == 0:
                log.append({"settings": settings})
            if progress:
                from tqdm import tqdm

                todo = tqdm(todo, desc=f"round {r}: sample", unit="batch")
            for chunk in todo:
                for rec in _sample_batch(cfg, r, model, tokenizer, chunk, users, labeller):
                    if rec["episode_id"] not in done:  # a batch a kill cut part-way: keep what was written
                        done[rec["episode_id"]] = rec
                        log.append(rec)
        finally:
            log.close()
    return [done[e.episode_id] for e in episodes]


def _policy(model: Any) -> Any:
    import torch

    return model.to("cuda").eval() if torch.cuda.is_available() else model.eval()


def _sample_batch(
    cfg: OnPolicyConfig, r: int, model: Any, tokenizer: Any, chunk: list[tuple[Episode, list[int]]],
    users: dict[str, User], labeller: Labeller,
) -> list[dict[str, Any]]:  # fmt: skip
    """`cfg.samples` answers per episode of `chunk` (sample j of episode e drawn from
    `row_seed("<r>:<e>", j)`), each scored by `labeller`; an empty answer is not scored (None)."""
    n = cfg.samples
    new = generate_batch(
        model,
        tokenizer,
        [ids for _, ids in chunk for _ in range(n)],
        rat=False,
        max_new_tokens=cfg.max_new_tokens,
        decoding=cfg.decoding,
        seeds=[cfg.decoding.row_seed(f"{r}:{e.episode_id}", j) for e, _ in chunk for j in range(n)],
    )
    texts = [parse_generation(tokenizer.decode(ids, skip_special_tokens=True)).answer for ids in new]
    answers = [texts[i * n : (i + 1) * n] for i in range(len(chunk))]
    items = [
        (users[e.user_id], e.query.question, [a for a in got if a.strip()])
        for (e, _), got in zip(chunk, answers, strict=True)
    ]
    scored = labeller.score(items)
    records = []
    for (e, _), got, scores in zip(chunk, answers, scored, strict=True):
        it = iter(scores)
        records.append({
            "episode_id": e.episode_id,
            "user_id": e.user_id,
            "question": e.query.question,
            "answers": got,
            "scores": [next(it) if a.strip() else None for a in got],
        })  # fmt: skip
    return records


# ------------------------------------------------------------------------------------------ pairs
def make_pairs(
    episodes: Sequence[Episode], records: Sequence[dict[str, Any]], r: int
) -> tuple[list[Episode], dict[str, int]]:
    """Each episode's best and worst scored answer as its query's chosen and rejected (the first of
    equal scores); an episode whose two are within `fspo.sim.reward.TIE_MARGIN`, or the same text, is
    a tie and left out (counted with the ties, too: the rare pair equal to one of its own shots,
    which an episode cannot hold)."""
    from fspo.sim.reward import TIE_MARGIN

    pairs: list[Episode] = []
    ties = 0
    for e, rec in zip(episodes, records, strict=True):
        scored = [(s, a) for s, a in zip(rec["scores"], rec["answers"], strict=True) if s is not None]
        if not scored:
            ties += 1
            continue
        best = max(scored, key=lambda sa: sa[0])
        worst = min(scored, key=lambda sa: sa[0])
        if best[0] - worst[0] <= TIE_MARGIN or best[1].strip() == worst[1].strip():
            ties += 1
            continue
        query = Preference(
            user_id=e.user_id, question=e.query.question, chosen=best[1], rejected=worst[1],
            metadata={"scores": [best[0], worst[0]], "onpolicy_round": r},
        )  # fmt: skip
        try:
            pair = e.model_copy(update={"episode_id": f"{e.episode_id}@r{r}", "query": query})
            pairs.append(Episode.model_validate(pair.model_dump()))  # a query equal to a shot is refused
        except ValidationError:
            ties += 1
    return pairs, {"pairs": len(pairs), "ties": ties}


def sample_stats(
    records: Sequence[dict[str, Any]], users: dict[str, User], labeller: Labeller
) -> dict[str, Any]:
    """What the round's samples look like (see the module doc: how to tell a real rise from gaming)."""
    answers = [(rec, a, s) for rec in records for a, s in zip(rec["answers"], rec["scores"], strict=True)]
    n = max(1, len(answers))
    scores = [s for _, _, s in answers if s is not None]
    stats: dict[str, Any] = {
        "episodes": len(records),
        "samples": len(answers),
        "empty": sum(not a.strip() for _, a, _ in answers),
        "mean_reward": round(sum(scores) / len(scores), 6) if labeller.absolute and scores else None,
        "mean_words": round(sum(len(a.split()) for _, a, _ in answers) / n, 3),
        "degenerate_share": round(sum(repetition_loop(a) for _, a, _ in answers) / n, 4),
    }
    return stats | _sim_measures(answers, users)


def _sim_measures(
    answers: Sequence[tuple[dict[str, Any], str, Any]], users: dict[str, User]
) -> dict[str, Any]:
    """Mean relevance to the question and share of the user's trait values carried, over answers to
    simulated users (None when the users are not simulated)."""
    from fspo.sim.base import RELEVANCE
    from fspo.sim.registry import get_domain

    relevance, carried = [], []
    for rec, answer, _ in answers:
        meta = users[rec["user_id"]].metadata or {}
        if "domain" not in meta or "traits" not in meta:
            return {"relevance": None, "trait_share": None}
        domain = get_domain(meta["domain"])
        feats = domain.features(rec["question"], [answer])[0]
        got = domain.carried(domain.check_traits(meta["traits"]), feats)
        carried.append(sum(got) / len(got))
        if RELEVANCE in domain.columns:
            relevance.append(float(feats[domain.columns.index(RELEVANCE)]))
    return {"relevance": _mean(relevance), "trait_share": _mean(carried)}


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


# ----------------------------------------------------------------------------------------- rounds
def _train_round(tc: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or find finished) the round's IPO run; its steps and final metrics."""
    from fspo.train.card import SUMMARY_FILE as TRAIN_SUMMARY  # with the trainer: both import torch
    from fspo.train.trainer import finished, train

    if not finished(tc):
        train(tc, resume=latest_checkpoint(Path(tc.out)) is not None)
    summary = read_fields(Path(tc.out) / TRAIN_SUMMARY)
    return {"steps": summary["steps"], "metrics": summary["metrics"], "eval": summary["eval"]}


def run_round(
    cfg: OnPolicyConfig, r: int, start: str, episodes: Sequence[Episode], users: dict[str, User],
    labeller: Labeller, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """Round `r` from policy `start`, or its record if it finished before; with the round's start
    model and trained model (paths under `cfg.out`, so a moved run folder still reads right)."""
    folder = Path(cfg.out) / f"round-{r}"
    paths = {"start_model": start, "model": str(round_model(cfg, r))}
    if (folder / ROUND_FILE).is_file():
        return {**read_fields(folder / ROUND_FILE), **paths}
    tc = round_train_config(cfg, start, folder, progress)
    chosen = round_episodes(episodes, cfg, r)
    records = sample_round(cfg, r, tc, chosen, users, labeller, folder / SAMPLES_FILE, progress)
    pairs, counts = make_pairs(chosen, records, r)
    if not pairs:
        raise UserError(
            f"round {r}: every episode's samples tied under the {labeller.name} labeller; sample more "
            "answers per episode (--samples) or at a higher temperature (--decoding-temperature)"
        )
    write_records(folder / PAIRS_FILE, pairs)
    examples = [
        {"question": p.query.question, "chosen": p.query.chosen, "rejected": p.query.rejected,
         "scores": p.query.metadata["scores"]}
        for p in pairs[:EXAMPLES]
    ]  # fmt: skip
    record = {
        "round": r,
        **counts,
        **sample_stats(records, users, labeller),
        "train": _train_round(tc),
        "examples": examples,
    }
    atomic_write_json(folder / ROUND_FILE, record)
    return {**record, **paths}


def round_model(cfg: OnPolicyConfig, r: int) -> Path:
    """The model round `r` trains: round r + 1's policy and reference."""
    return Path(cfg.out) / f"round-{r}" / "train" / MODEL_DIR


def _place_model(src: Path, out: Path) -> None:
    """Copy the last round's model to ``out/model``, all or nothing."""
    tmp, final = out / ".model.tmp", out / MODEL_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def run_onpolicy(
    cfg: OnPolicyConfig, progress: bool = False, overwrite: bool = False, labeller: Labeller | None = None
) -> dict[str, Any]:
    """Run (or resume, or extend by more rounds) on-policy FSPO as `cfg` says; returns the summary
    also written to ``out/summary.json``: ``{"rounds": [one record per round], "model": out/model}``.

    `labeller` replaces the one `cfg.judge` names (a caller's own labeller: another simulator, a
    judge of `fspo.eval.judges` through `PairwiseLabeller`). An `out` holding an on-policy run of
    other settings is refused unless `overwrite` (`fspo.core.outputs`).
    """
    out = Path(cfg.out)
    params = cfg.model_dump(mode="json", exclude={"out", "rounds"})
    owns = ("round-*", SUMMARY_FILE, MODEL_DIR, ".model.tmp", CONFIG_FILE, JUDGE_CACHE)
    folder = OutputFolder(out, "train onpolicy", params, owns, overwrite=overwrite, resumable=True)
    with folder.preparing():
        users = read_users(cfg.users)
        episodes = training_episodes(cfg.episodes, users)
    with folder.writing():
        atomic_write_json(out / CONFIG_FILE, cfg.model_dump(mode="json"))
        labeller = labeller or make_labeller(cfg.judge, out)
        rounds: list[dict[str, Any]] = []
        start = cfg.model
        for r in range(cfg.rounds):
            rounds.append(run_round(cfg, r, start, episodes, users, labeller, progress))
            start = str(round_model(cfg, r))
            atomic_write_json(out / SUMMARY_FILE, {"rounds": rounds, "model": None})
        _place_model(Path(start), out)
        summary = {"rounds": rounds, "model": str(out / MODEL_DIR)}
        atomic_write_json(out / SUMMARY_FILE, summary)
    return summary
