"""Sampling few-shot episodes per user: N shots of one user, then a new query of the same user.

Splits (the question FSPO asks: does the model personalize to a user from a few examples?):

  * ``train``       – users of the training split; shots and query from their training preferences.
  * ``test_seen``   – the same training users, but each query is one of the user's *held-out*
                      preferences (``heldout_per_user`` distinct questions per user, never used in
                      any training episode); its shots come from the user's training preferences.
  * ``test_unseen`` – users never seen in training; shots and query from their own preferences.

Which users are test users: a ``"split": "train" | "test"`` in `User.metadata` is honoured (the
simulator marks users with held-out trait combinations as test; the Review import marks the
interpolated users); the remaining users are split by ``test_user_fraction``.

How shots are drawn (the official FSPO dataloader, made deterministic): for each pass, a user's
preferences are shuffled and cut into consecutive blocks of N+1; in each block the first N are the
shots and the last is the query. A pass therefore uses every preference at most once, and the
leftover (fewer than N+1) sits out that pass only; later passes reshuffle. Training makes
``2 * (N + 1)`` passes by default, as the official code. Each user has its own random stream
derived from (seed, user, split), so adding or removing a user never changes another user's
episodes, as long as the user split is unchanged (`metadata.split` pins it; the
`test_user_fraction` draw is over all unmarked users). ``test_seen`` draws N shots uniformly
without replacement for each held-out query.

Several queries per shot set (``questions_per_context=K``, default 1): blocks are N+K long, the
first N are the shots and each of the other K is the query of its own episode, so K episodes share
one shot set (ids ``{split}-{user}-{pass}-{block}-{j}``; a final leftover of N+1..N+K-1 preferences
makes a block with fewer queries). ``test_seen`` draws one shot set per K held-out queries. The
trainer's ``questions_per_context=K`` then scores those K queries in one row, running the shots once
(docs/speed.md). With K=1 every block is N shots and one query: one episode per block.

Nothing is dropped silently: users too small to sample, duplicate preferences and preferences
without a `User` record are counted in the `SamplingReport` attached to the result. Repeated records
of a data folder are resolved (by line, with a policy) when the folder is read
(`fspo.data.io.read_dataset_dir`); the check here is the safety net for records passed in from Python,
which are named by their position (``preferences[i]``, ``users[i]``).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from fspo.core.errors import DataError, UserError
from fspo.core.files import atomic_write_json
from fspo.core.outputs import require_finished
from fspo.core.rng import seeded_rng
from fspo.data.io import ReadReport, gc_paused, iter_records, iter_rows, read_records, write_records
from fspo.data.schema import Episode, Preference, User

SPLITS = ("train", "test_seen", "test_unseen")
META_FILE = "meta.json"
_SHOWN = 5  # how many example user ids a message names


@dataclass
class SamplingReport:
    """What the sampler left out and why; `lines()` is what the CLI prints."""

    users_total: int = 0
    train_users: list[str] = field(default_factory=list)
    test_users: list[str] = field(default_factory=list)
    too_few: dict[str, int] = field(default_factory=dict)  # user -> number of preferences
    no_heldout: dict[str, int] = field(default_factory=dict)  # train users too small to hold out
    duplicates: int = 0
    duplicate_items: list[str] = field(default_factory=list)  # 'preferences[i] (user): same as [j]'
    repeated_users: list[str] = field(default_factory=list)  # 'u1 (users[2], users[5])': the last is used
    users_without_record: list[str] = field(default_factory=list)
    users_without_preferences: list[str] = field(default_factory=list)

    def lines(self, shots: int) -> list[str]:
        out = []
        if self.too_few:
            out.append(
                f"skipped {len(self.too_few)} users with fewer than {shots + 1} preferences "
                f"(needed for {shots} shots + 1 query): {_examples(self.too_few)}"
            )
        if self.no_heldout:
            out.append(
                f"{len(self.no_heldout)} training users have too few preferences to hold any out, "
                f"so they have no test_seen episodes: {_examples(self.no_heldout)}"
            )
        if self.duplicates:
            out.append(
                f"ignored {self.duplicates} duplicate preferences (same user, question and answers): "
                f"{_examples(self.duplicate_items)}"
            )
        if self.repeated_users:
            out.append(
                f"{len(self.repeated_users)} user ids have more than one User record; the last of each is "
                f"used: {_examples(self.repeated_users)}"
            )
        if self.users_without_record:
            out.append(
                f"{len(self.users_without_record)} users have preferences but no users.jsonl record "
                f"(no description): {_examples(self.users_without_record)}"
            )
        if self.users_without_preferences:
            out.append(
                f"{len(self.users_without_preferences)} users have no preferences: "
                f"{_examples(self.users_without_preferences)}"
            )
        return out


def _examples(items: Iterable[str] | dict[str, int]) -> str:
    if isinstance(items, dict):
        shown = [f"{k} ({v})" for k, v in list(items.items())[:_SHOWN]]
        n = len(items)
    else:
        items = list(items)
        shown, n = items[:_SHOWN], len(items)
    return ", ".join(shown) + (f", ... ({n - _SHOWN} more)" if n > _SHOWN else "")


class EpisodeSplits(dict[str, list[Episode]]):
    """``{split: [Episode, ...]}`` for the three splits, plus the `report` of what was left out."""

    report: SamplingReport

    def counts(self) -> dict[str, int]:
        return {split: len(self.get(split, [])) for split in SPLITS}


def _key(p: Preference) -> tuple[str, str, str]:
    return (p.question, p.chosen, p.rejected)


def split_users(user_ids: Sequence[str], users: dict[str, User], test_user_fraction: float, seed: int):
    """(train, test) user ids: `metadata["split"]` where given, else `test_user_fraction` at random."""
    if not 0.0 <= test_user_fraction < 1.0:
        raise UserError(f"test_user_fraction must be in [0, 1), got {test_user_fraction}")
    train, test, free = [], [], []
    for uid in user_ids:
        user = users.get(uid)
        marked = user.metadata.get("split") if user is not None else None
        if marked is None:
            free.append(uid)
        elif marked == "train":
            train.append(uid)
        elif marked == "test":
            test.append(uid)
        else:
            raise UserError(f"user {uid!r}: metadata.split must be 'train' or 'test', got {marked!r}")
    free = sorted(free)
    seeded_rng(seed, "user-split").shuffle(free)
    n_test = round(test_user_fraction * len(free))
    if test_user_fraction > 0 and len(free) >= 2:
        n_test = min(max(n_test, 1), len(free) - 1)  # at least one of each when both are asked for
    test += free[:n_test]
    train += free[n_test:]
    return sorted(train), sorted(test)


def _blocks(pool: list[Preference], shots: int, passes: int, rng: random.Random, queries: int = 1):
    """Yield (pass, index, shots, queries): per pass, shuffle and cut into blocks of shots + `queries`.

    With queries > 1 a final leftover that still holds shots + 1 preferences is a shorter block, so
    a user is never left out for want of K queries. With queries = 1 there is no such leftover.
    """
    size = shots + queries
    for p in range(passes):
        order = list(pool)
        rng.shuffle(order)
        starts = list(range(0, len(order) - size + 1, size))
        tail = len(starts) * size
        if len(order) - tail >= shots + 1:
            starts.append(tail)
        for i, start in enumerate(starts):
            block = order[start : start + size]
            yield p, i, block[:shots], block[shots:]


def build_episodes(
    preferences: Iterable[Preference],
    users: Iterable[User] = (),
    shots: int = 4,
    train_passes: int | None = None,
    test_passes: int = 1,
    test_user_fraction: float = 0.2,
    heldout_per_user: int = 2,
    seed: int = 0,
    questions_per_context: int = 1,
) -> EpisodeSplits:
    """Sample train / test_seen / test_unseen episodes; see the module docstring for the rules.

    `heldout_per_user` counts distinct questions of each training user held out as test_seen
    queries (all that user's preferences on those questions leave the training pool). A training
    user needs at least ``shots + 1 + heldout_per_user`` distinct preferences to get test_seen
    episodes; with fewer it still trains. `questions_per_context` = K queries per drawn shot set
    (K episodes sharing their shots, adjacent in the train file). Deterministic for a given `seed`.
    """
    if questions_per_context < 1:
        raise UserError(f"questions_per_context must be >= 1, got {questions_per_context}")
    with gc_paused():
        return _build(
            preferences,
            users,
            shots,
            train_passes,
            test_passes,
            test_user_fraction,
            heldout_per_user,
            seed,
            questions_per_context,
        )


def _build(
    preferences: Iterable[Preference],
    users: Iterable[User],
    shots: int,
    train_passes: int | None,
    test_passes: int,
    test_user_fraction: float,
    heldout_per_user: int,
    seed: int,
    k: int = 1,
) -> EpisodeSplits:
    if shots < 0:
        raise UserError(f"shots must be >= 0, got {shots}")
    train_passes = 2 * (shots + 1) if train_passes is None else train_passes
    if train_passes < 0 or test_passes < 0 or heldout_per_user < 0:
        raise UserError("train_passes, test_passes and heldout_per_user must be >= 0")

    report = SamplingReport()
    user_by_id = _index_users(users, report)
    by_user = _preferences_by_user(preferences, report)
    report.users_without_record = sorted(uid for uid in by_user if uid not in user_by_id)
    report.users_without_preferences = sorted(uid for uid in user_by_id if uid not in by_user)
    report.users_total = len(by_user)

    usable = sorted(uid for uid, prefs in by_user.items() if len(prefs) >= shots + 1)
    report.too_few = {uid: len(by_user[uid]) for uid in sorted(by_user) if len(by_user[uid]) < shots + 1}
    train_ids, test_ids = split_users(usable, user_by_id, test_user_fraction, seed)
    report.train_users, report.test_users = train_ids, test_ids

    out = EpisodeSplits({split: [] for split in SPLITS})
    out.report = report
    maker = _EpisodeMaker(user_by_id, seed, k)
    train_groups: list[list[Episode]] = []
    for uid in train_ids:
        pool, heldout = _hold_out(by_user[uid], shots, heldout_per_user, seeded_rng(seed, uid, "heldout"))
        if heldout_per_user and not heldout:
            report.no_heldout[uid] = len(by_user[uid])
        rng = seeded_rng(seed, uid, "train")
        train_groups += maker.per_block("train", uid, _blocks(pool, shots, train_passes, rng, k))
        out["test_seen"] += maker.test_seen(uid, pool, heldout, shots, test_passes)

    for uid in test_ids:
        rng = seeded_rng(seed, uid, "test_unseen")
        for group in maker.per_block("test_unseen", uid, _blocks(by_user[uid], shots, test_passes, rng, k)):
            out["test_unseen"].extend(group)

    # Training reads episodes in file order; mixing users makes every batch a mix of users. Whole
    # groups are shuffled, so the K episodes sharing a shot set stay adjacent (with K = 1 this is
    # the same permutation as shuffling the episodes: `shuffle` depends only on the length).
    seeded_rng(seed, "train-order").shuffle(train_groups)
    out["train"] = [e for group in train_groups for e in group]
    return out


def _index_users(users: Iterable[User], report: SamplingReport) -> dict[str, User]:
    """The users by id; an id given more than once keeps its last record (as a dict built from them
    would) and is named in `report.repeated_users` with its positions."""
    user_by_id: dict[str, User] = {}
    user_at: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        user_by_id[user.user_id] = user
        user_at.setdefault(user.user_id, []).append(i)
    report.repeated_users = [
        f"{uid} ({', '.join(f'users[{i}]' for i in at)})" for uid, at in user_at.items() if len(at) > 1
    ]
    return user_by_id


def _preferences_by_user(
    preferences: Iterable[Preference], report: SamplingReport
) -> dict[str, list[Preference]]:
    """Each user's preferences in input order; a repeat (same user, question and answers) is counted
    in `report` and dropped, since it could end up as its own twin's shot."""
    by_user: dict[str, list[Preference]] = defaultdict(list)
    seen: dict[tuple[str, tuple[str, str, str]], int] = {}
    for i, pref in enumerate(preferences):
        key = (pref.user_id, _key(pref))
        j = seen.setdefault(key, i)
        if j != i:
            report.duplicates += 1
            report.duplicate_items.append(f"preferences[{i}] ({pref.user_id}): same as preferences[{j}]")
            continue
        by_user[pref.user_id].append(pref)
    return by_user


@dataclass
class _EpisodeMaker:
    """Makes the episodes of one sampling run, so every split names and describes them alike."""

    users: dict[str, User]
    seed: int
    k: int  # queries per shot set

    def episode(
        self, split: str, uid: str, p: int, i: int | str, shot_list: list[Preference], query: Preference
    ) -> Episode:
        user = self.users.get(uid)
        return Episode(
            episode_id=f"{split}-{uid}-{p}-{i}",  # unique: `i` is a block, or a block-query pair
            user_id=uid,
            shots=shot_list,
            query=query,
            description=user.description if user else None,
            split=split,
            metadata={"pass": p, "seed": self.seed},
        )

    def per_block(self, split: str, uid: str, blocks: Iterable[tuple]) -> list[list[Episode]]:
        """One group of episodes per block of `_blocks`; K > 1 numbers each query within its block."""
        groups = []
        for p, i, shot_list, queries in blocks:
            ids = [i] if self.k == 1 else [f"{i}-{j}" for j in range(len(queries))]
            groups.append(
                [self.episode(split, uid, p, n, shot_list, q) for n, q in zip(ids, queries, strict=True)]
            )
        return groups

    def test_seen(
        self, uid: str, pool: list[Preference], heldout: list[Preference], shots: int, passes: int
    ) -> list[Episode]:
        """A training user's held-out queries, each pass drawing one shot set from `pool` per K queries."""
        rng = seeded_rng(self.seed, uid, "test_seen")
        episodes = []
        for p in range(passes):
            for start in range(0, len(heldout), self.k):
                shot_list = rng.sample(pool, shots)
                for i, query in enumerate(heldout[start : start + self.k], start=start):
                    episodes.append(self.episode("test_seen", uid, p, i, shot_list, query))
        return episodes


def _hold_out(
    prefs: list[Preference], shots: int, heldout_per_user: int, rng: random.Random
) -> tuple[list[Preference], list[Preference]]:
    """Split one user's preferences into (training pool, held-out queries) by question.

    Holding out whole questions keeps the held-out query's question out of that user's training
    episodes. If the remaining pool would fall below shots + 1, nothing is held out.
    """
    if heldout_per_user == 0:
        return list(prefs), []
    questions = sorted({p.question for p in prefs})
    rng.shuffle(questions)
    held = set(questions[:heldout_per_user])
    pool = [p for p in prefs if p.question not in held]
    heldout = [p for p in prefs if p.question in held]
    if len(held) < heldout_per_user or len(pool) < shots + 1:
        return list(prefs), []
    return pool, heldout


# What `write_episodes` writes in a folder, in any record format (what `--overwrite` removes).
OUTPUTS = (*(f"{split}.*" for split in SPLITS), META_FILE)


def write_episodes(
    out_dir: str | Path, episodes_by_split: dict[str, list[Episode]], meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``<split>.jsonl`` for the three splits, then ``meta.json`` (counts + `meta`) last.

    Each file is written atomically; `meta.json` goes last, so its presence means the set is
    complete. Returns the meta dict written.
    """
    out_dir = Path(out_dir)
    counts = {}
    for split in SPLITS:
        counts[split] = write_records(out_dir / f"{split}.jsonl", episodes_by_split.get(split, []))
    full_meta: dict[str, Any] = {**(meta or {}), "counts": counts}
    report = getattr(episodes_by_split, "report", None)
    if isinstance(report, SamplingReport):
        full_meta.setdefault("report", _report_summary(report))
    atomic_write_json(out_dir / META_FILE, full_meta)
    return full_meta


def _report_summary(report: SamplingReport) -> dict[str, Any]:
    data = asdict(report)
    data["train_users"] = len(report.train_users)
    data["test_users"] = len(report.test_users)
    return data


def episodes_file(path: str | Path, split: str = "train") -> Path:
    """The file holding one split: `path` itself, or in an episode folder ``<split>.jsonl``.

    A folder may also name it ``<split>_episodes.jsonl`` or ``episodes_<split>.jsonl``.
    """
    path = Path(path)
    if path.is_dir():
        require_finished(path)  # a run stopped between its files is not a set of episodes
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        for name in (f"{split}.jsonl", f"{split}_episodes.jsonl", f"episodes_{split}.jsonl"):
            if (path / name).is_file():
                return path / name
        if not (path / META_FILE).exists():
            raise UserError(
                f"{path}: not a complete episode folder (no {META_FILE}); run `fspo data episodes`"
            )
        raise UserError(
            f"episodes folder {str(path)!r} has no '{split}.jsonl'; build episodes with `fspo data episodes`"
        )
    if not path.is_file():
        raise UserError(f"episodes file {str(path)!r} does not exist")
    return path


def load_episodes(path: str | Path, split: str = "train", limit: int | None = None) -> list[Episode]:
    """The episodes of one split: an episode folder's ``<split>.jsonl`` (see `episodes_file`), or a file.

    Every record read is validated; a bad one is reported as 'file:line: field: message', all of
    them in one error. An empty file gives no episodes (a split may be empty: no test users). A file
    of preferences or users passed by mistake is named as such, with what is needed instead. With
    `limit`, reading stops after that many episodes (a short run over a file of 10^5 episodes, ~1 GB
    at 8 shots, would otherwise parse all of them first).
    """
    file = episodes_file(path, split)
    try:
        if limit is not None:
            # Reading stops early, before the end-of-file check of `iter_records`: the problems of
            # the lines read are checked here instead, so a bad record is never silently passed over.
            report = ReadReport(str(file))
            with gc_paused():
                episodes = list(islice(iter_records(file, Episode, True, report, allow_empty=True), limit))
            if report.problems:  # reported below as the file's invalid records
                raise DataError(str(file), report.problems)
            return episodes
        return read_records(file, Episode, allow_empty=True)
    except DataError as err:
        _refuse_other_records(file)
        if not err.problems:
            raise
        # read_records' message offers --skip-invalid, which no episode reader takes
        raise DataError(f"{len(err.problems)} invalid episode record(s) in {file}", err.problems) from None


def _refuse_other_records(file: Path) -> None:
    """Raise a `UserError` naming what `file` holds when its first record is not an episode at all."""
    where, row = next(iter_rows(file, []), ("", None))
    if isinstance(row, dict) and "shots" not in row and "query" not in row:
        kind = "preferences" if {"question", "chosen", "rejected"} <= row.keys() else "records"
        raise UserError(
            f"{file} holds {kind}, not episodes ({where} has no 'shots'/'query'): episodes are N shots "
            "+ a query pair per user; build them with `fspo data episodes`"
        )


def load_meta(directory: str | Path) -> dict[str, Any]:
    """The `meta.json` of an episode folder."""
    path = Path(directory) / META_FILE
    if not path.exists():
        raise UserError(f"{path}: no such file; run `fspo data episodes` first")
    return json.loads(path.read_text(encoding="utf-8"))
