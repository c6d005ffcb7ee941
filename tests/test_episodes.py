"""The episode sampler: properties over random populations, the user split, reporting, files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fspo.core.errors import DataError, UserError
from fspo.data.episodes import SPLITS, build_episodes, load_episodes, load_meta, write_episodes
from fspo.data.schema import Episode, Preference, User


def item(p: Preference) -> tuple[str, str, str, str]:
    return (p.user_id, p.question, p.chosen, p.rejected)


def population(
    sizes: list[int], questions_per_user: int | None = None
) -> tuple[list[Preference], list[User]]:
    """User i has sizes[i] preferences; questions repeat when questions_per_user is smaller."""
    prefs, users = [], []
    for u, n in enumerate(sizes):
        uid = f"user{u}"
        users.append(User(user_id=uid, description=f"description of {uid}"))
        for k in range(n):
            q = k % questions_per_user if questions_per_user else k
            prefs.append(Preference(user_id=uid, question=f"q{q}", chosen=f"good {k}", rejected=f"bad {k}"))
    return prefs, users


populations = st.lists(st.integers(min_value=0, max_value=14), min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(
    sizes=populations,
    shots=st.integers(min_value=0, max_value=4),
    fraction=st.sampled_from([0.0, 0.2, 0.5]),
    heldout=st.integers(min_value=0, max_value=3),
    repeat_questions=st.sampled_from([None, 3]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_sampler_properties(sizes, shots, fraction, heldout, repeat_questions, seed) -> None:
    prefs, users = population(sizes, repeat_questions)
    kwargs = dict(
        shots=shots, test_user_fraction=fraction, heldout_per_user=heldout, seed=seed, train_passes=2
    )
    result = build_episodes(prefs, users, **kwargs)
    known = {item(p) for p in prefs}

    for split in SPLITS:
        for ep in result[split]:
            assert ep.split == split and ep.num_shots == shots
            assert all(s.user_id == ep.user_id for s in [*ep.shots, ep.query])  # one user
            assert item(ep.query) not in {item(s) for s in ep.shots}  # query never among its shots
            assert len({item(s) for s in ep.shots}) == shots  # no shot twice
            assert {item(s) for s in [*ep.shots, ep.query]} <= known
            assert ep.description == f"description of {ep.user_id}"
        ids = [ep.episode_id for ep in result[split]]
        assert len(ids) == len(set(ids))

    train_users = {ep.user_id for ep in result["train"]}
    assert train_users.isdisjoint({ep.user_id for ep in result["test_unseen"]})
    assert {ep.user_id for ep in result["test_seen"]} <= train_users
    train_items = {item(p) for ep in result["train"] for p in [*ep.shots, ep.query]}
    train_questions = {(ep.user_id, p.question) for ep in result["train"] for p in [*ep.shots, ep.query]}
    for ep in result["test_seen"]:
        assert item(ep.query) not in train_items  # held-out preferences never trained on
        assert (ep.user_id, ep.query.question) not in train_questions  # nor their questions
    heldout_items = {item(ep.query) for ep in result["test_seen"]}
    for ep in result["test_seen"]:
        assert heldout_items.isdisjoint(item(s) for s in ep.shots)  # shots from training preferences

    # Users too small are reported, never silently dropped; everyone else lands in one split.
    report = result.report
    assert set(report.too_few) == {f"user{i}" for i, n in enumerate(sizes) if 0 < n < shots + 1}
    assert set(report.train_users) | set(report.test_users) | set(report.too_few) == {
        f"user{i}" for i, n in enumerate(sizes) if n
    }
    assert set(report.train_users).isdisjoint(report.test_users)

    again = build_episodes(prefs, users, **kwargs)
    assert again == result  # deterministic for a seed


def test_block_sampling_counts_and_passes() -> None:
    prefs, users = population([12])
    result = build_episodes(prefs, users, shots=3, heldout_per_user=0, test_user_fraction=0.0, seed=1)
    # 2*(3+1) = 8 passes by default, each cutting 12 preferences into 3 blocks of 4.
    assert len(result["train"]) == 8 * 3
    for p in range(8):
        in_pass = [ep for ep in result["train"] if ep.metadata["pass"] == p]
        used = [item(x) for ep in in_pass for x in [*ep.shots, ep.query]]
        assert len(used) == len(set(used)) == 12  # a pass uses every preference exactly once
    assert {ep.episode_id for ep in result["train"]} >= {"train-user0-0-0", "train-user0-7-2"}
    assert result["test_seen"] == [] and result["test_unseen"] == []


def test_test_seen_counts_and_passes() -> None:
    prefs, users = population([10, 10])
    result = build_episodes(prefs, users, shots=2, heldout_per_user=3, test_passes=2, test_user_fraction=0.0)
    assert len(result["test_seen"]) == 2 * 3 * 2  # users x held-out questions x passes
    # 7 training preferences left per user: 2 blocks of 3 per pass, 6 passes.
    assert len(result["train"]) == 2 * 2 * 6


def test_seeds_differ_and_adding_a_user_changes_no_one_else() -> None:
    prefs, users = population([9, 9, 9])
    a = build_episodes(prefs, users, shots=2, test_user_fraction=0.0, seed=0)
    b = build_episodes(prefs, users, shots=2, test_user_fraction=0.0, seed=1)
    assert a["train"] != b["train"]
    more_prefs, more_users = population([9, 9, 9, 9])
    c = build_episodes(more_prefs, more_users, shots=2, test_user_fraction=0.0, seed=0)

    def by_id(eps: list[Episode]) -> dict[str, Episode]:
        return {e.episode_id: e for e in eps}

    old, new = by_id(a["train"]), by_id(c["train"])
    assert all(new[k] == v for k, v in old.items())


def test_metadata_split_is_honoured_and_fraction_splits_the_rest() -> None:
    prefs, _ = population([5] * 10)
    users = [User(user_id=f"user{i}", metadata={"split": "test"} if i < 2 else {}) for i in range(10)]
    users[9] = User(user_id="user9", metadata={"split": "train"})
    result = build_episodes(prefs, users, shots=1, test_user_fraction=0.25, seed=3)
    report = result.report
    assert {"user0", "user1"} <= set(report.test_users) and "user9" in report.train_users
    assert len(report.test_users) == 2 + 2  # round(0.25 * 7 unmarked users) = 2
    assert {e.user_id for e in result["test_unseen"]} == set(report.test_users)
    bad = [User(user_id="user0", metadata={"split": "validation"})]
    with pytest.raises(UserError, match="user 'user0': metadata.split must be 'train' or 'test'"):
        build_episodes(prefs, bad, shots=1)


def test_small_users_duplicates_and_unknown_users_are_reported() -> None:
    prefs, users = population([2, 6, 6])
    prefs.append(prefs[-1])  # a duplicate
    prefs.append(Preference(user_id="ghost", question="q", chosen="a", rejected="b"))
    users.append(User(user_id="idle"))
    result = build_episodes(prefs, users, shots=3, heldout_per_user=3, test_user_fraction=0.0)
    lines = result.report.lines(3)
    assert lines == [
        "skipped 2 users with fewer than 4 preferences (needed for 3 shots + 1 query): ghost (1), user0 (2)",
        "2 training users have too few preferences to hold any out, so they have no test_seen episodes: "
        "user1 (6), user2 (6)",
        "ignored 1 duplicate preferences (same user, question and answers): "
        "preferences[14] (user2): same as preferences[13]",
        "1 users have preferences but no users.jsonl record (no description): ghost",
        "1 users have no preferences: idle",
    ]


def test_bad_arguments() -> None:
    prefs, users = population([5])
    with pytest.raises(UserError, match="test_user_fraction"):
        build_episodes(prefs, users, shots=1, test_user_fraction=1.0)
    with pytest.raises(UserError, match="shots"):
        build_episodes(prefs, users, shots=-1)


def test_write_and_load_episode_folder(tmp_path: Path) -> None:
    prefs, users = population([8] * 6)
    result = build_episodes(prefs, users, shots=2, test_user_fraction=0.34, seed=5)
    meta = write_episodes(tmp_path / "eps", result, {"seed": 5, "shots": 2, "source": "data/x"})
    assert meta["counts"] == result.counts()
    assert sorted(p.name for p in (tmp_path / "eps").iterdir()) == [
        "meta.json",
        "test_seen.jsonl",
        "test_unseen.jsonl",
        "train.jsonl",
    ]
    for split in SPLITS:
        assert load_episodes(tmp_path / "eps", split) == result[split]
    loaded_meta = load_meta(tmp_path / "eps")
    assert loaded_meta["seed"] == 5 and loaded_meta["source"] == "data/x"
    assert loaded_meta["report"]["test_users"] == 2
    with pytest.raises(UserError, match="unknown split"):
        load_episodes(tmp_path / "eps", "dev")
    with pytest.raises(UserError, match="not a complete episode folder"):
        load_episodes(tmp_path, "train")
    # `limit` stops reading early, and still reports a bad record among the lines it read
    assert load_episodes(tmp_path / "eps", "train", limit=3) == result["train"][:3]
    lines = (tmp_path / "eps" / "train.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"shots"', '"shotz"', 1)
    (tmp_path / "eps" / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_episodes(tmp_path / "eps", "train", limit=3)
    assert "train.jsonl:2" in "\n".join(err.value.problems)


def test_cli_episodes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fspo.data.cli import app
    from fspo.data.io import write_dataset_dir

    prefs, users = population([10] * 5 + [2])
    write_dataset_dir(tmp_path / "data", prefs, users)
    args = [
        "episodes",
        "--data",
        tmp_path / "data",
        "--shots",
        "3",
        "--out",
        tmp_path / "eps",
        "--seed",
        "7",
        "--test-user-fraction",
        "0.2",
        "--heldout-per-user",
        "1",
        "--train-passes",
        "2",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert (
        "skipped 1 users with fewer than 4 preferences (needed for 3 shots + 1 query): user5 (2)"
        in result.output
    )
    meta = load_meta(tmp_path / "eps")
    assert meta["seed"] == 7 and meta["shots"] == 3 and meta["source"] == str(tmp_path / "data")
    # 4 training users: 9 preferences left after holding out 1 -> 2 blocks per pass, 2 passes.
    assert meta["counts"] == {"train": 4 * 2 * 2, "test_seen": 4, "test_unseen": 2}
    table_rows = [line.split() for line in result.output.splitlines() if line.strip().startswith("│ ")]
    assert [r[1:6:2] for r in table_rows] == [
        ["train", "4", "16"],
        ["test_seen", "4", "4"],
        ["test_unseen", "1", "2"],
    ]
    assert load_episodes(tmp_path / "eps", "test_seen")[0].num_shots == 3


def test_cli_episodes_skip_invalid_is_reported(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fspo.data.cli import app
    from fspo.data.io import write_dataset_dir

    prefs, users = population([6])
    write_dataset_dir(tmp_path / "data", prefs, users)
    with open(tmp_path / "data" / "preferences.jsonl", "a") as f:
        f.write('{"user_id": "user0", "question": "q", "chosen": "x", "rejected": "x"}\n')
    args = ["episodes", "--data", str(tmp_path / "data"), "--shots", "1", "--out", str(tmp_path / "eps")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError) and "preferences.jsonl:7: rejected" in str(
        result.exception
    )
    result = CliRunner().invoke(app, [*args, "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "6 valid of 7 records, 1 skipped" in result.output
    assert load_meta(tmp_path / "eps")["skipped_invalid_records"] == 1


def test_cli_episodes_questions_per_context_keeps_siblings_adjacent(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fspo.data.cli import app
    from fspo.data.io import write_dataset_dir

    prefs, users = population([12, 12, 12])
    write_dataset_dir(tmp_path / "data", prefs, users)
    args = ["episodes", "--data", str(tmp_path / "data"), "--shots", "2", "--out", str(tmp_path / "eps")]
    result = CliRunner().invoke(app, [*args, "--questions-per-context", "2", "--test-user-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert load_meta(tmp_path / "eps")["questions_per_context"] == 2
    train = load_episodes(tmp_path / "eps", "train")
    pairs = list(zip(train[0::2], train[1::2], strict=False))
    # consecutive siblings: one user, the very same shots, two different queries
    assert all(a.user_id == b.user_id and a.shots == b.shots and a.query != b.query for a, b in pairs)


def test_cli_episodes_that_would_be_empty_is_an_error(tmp_path: Path) -> None:
    # --shots larger than any user's preferences makes no episode: an error, and nothing written.
    from conftest import data_cli
    from fspo.data.io import write_dataset_dir

    prefs, users = population([6, 6])
    write_dataset_dir(tmp_path / "data", prefs, users)
    code, out = data_cli("episodes", "--data", tmp_path / "data", "--shots", 500, "--out", tmp_path / "eps")
    assert code == 2 and "--shots 500" in out and "nothing was written" in out
    assert not (tmp_path / "eps").exists()
