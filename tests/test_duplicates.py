"""Repeated records in a data folder: found by line, resolved by `--on-duplicate error|first|last`.

A user id on two lines of users.jsonl, or one user's preference on the same question and answer pair
on two lines of preferences.jsonl: an exact repeat keeps the first and is noted with both lines; a
repeat that says something else (a swapped label, another description or metadata) is a conflict, an
error naming both lines unless the policy keeps the first or the last. Also: JSON errors in record
files name the file, the line and the true column.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import CLI_ENV, FSPO_CLI, write_jsonl
from fspo.core.errors import DataError, UserError
from fspo.data.episodes import build_episodes
from fspo.data.io import read_dataset_dir, read_records, write_records
from fspo.data.schema import Preference, User
from fspo.testing import toy_preferences, toy_users


def folder(tmp_path: Path, prefs: list, users: list) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    write_jsonl(d / "preferences.jsonl", prefs)
    write_jsonl(d / "users.jsonl", users)
    return d


def pref(user: str, q: str, chosen: str, rejected: str, **meta) -> Preference:
    return Preference(user_id=user, question=q, chosen=chosen, rejected=rejected, metadata=meta)


U1 = User(user_id="u1", description="likes red")
U2 = User(user_id="u2", description="likes blue")
P1 = pref("u1", "q1", "red", "blue")
P2 = pref("u1", "q2", "red", "green")
P3 = pref("u2", "q1", "blue", "red")


# --- users ---


def test_no_repeats_reads_as_before(tmp_path: Path) -> None:
    d = folder(tmp_path, [P1, P2, P3], [U1, U2])
    prefs, users, reports = read_dataset_dir(d)
    assert (prefs, users) == ([P1, P2, P3], [U1, U2])
    assert [r.dropped for r in reports] == [[], []]


def test_exact_user_repeat_keeps_the_first_with_a_note(tmp_path: Path) -> None:
    d = folder(tmp_path, [P1, P3], [U1, U2, U1])
    for policy in ("error", "first", "last"):  # nothing to choose between: always the first
        _, users, reports = read_dataset_dir(d, on_duplicate=policy)
        assert users == [U1, U2]
        assert reports[1].dropped == [f"{d}/users.jsonl:3: duplicate of line 1 (user u1); kept line 1"]


def test_conflicting_users_are_an_error_naming_both_lines(tmp_path: Path) -> None:
    other = User(user_id="u1", description="likes green", metadata={"split": "test"})
    d = folder(tmp_path, [P1, P3], [U1, U2, other])
    with pytest.raises(DataError) as info:
        read_dataset_dir(d, on_duplicate="error")
    assert "--on-duplicate first|last" in str(info.value)
    assert info.value.problems == [
        f"{d}/users.jsonl:3: user u1: conflicts with {d}/users.jsonl:1 "
        "(description differs; metadata.split differs)"
    ]
    _, users, reports = read_dataset_dir(d, on_duplicate="first")
    assert users == [U1, U2]
    assert reports[1].dropped == [
        f"{d}/users.jsonl:3: conflicts with line 1 (user u1: description differs; metadata.split differs); "
        "kept line 1"
    ]
    _, users, reports = read_dataset_dir(d, on_duplicate="last")
    assert users == [other, U2]
    assert reports[1].dropped[0].startswith(f"{d}/users.jsonl:1: conflicts with line 3 (user u1: ")
    assert reports[1].dropped[0].endswith("; kept line 3")


# --- preferences ---


def test_exact_preference_repeat_keeps_the_first(tmp_path: Path) -> None:
    d = folder(tmp_path, [P1, P2, P1, P3], [U1, U2])
    (d / "preferences.jsonl").write_text((d / "preferences.jsonl").read_text().replace("\n", "\n\n", 1))
    prefs, _, reports = read_dataset_dir(d)  # the blank line 2 moves the repeat to line 4
    assert prefs == [P1, P2, P3]
    assert reports[0].dropped == [
        f"{d}/preferences.jsonl:4: duplicate of line 1 (user u1, question 'q1'); kept line 1"
    ]
    assert reports[0].valid == 4 and reports[0].skipped == 0  # a repeat is valid, just not used twice


def test_swapped_label_is_a_conflict(tmp_path: Path) -> None:
    swapped = pref("u1", "q1", "blue", "red")
    d = folder(tmp_path, [P1, P2, swapped, P3], [U1, U2])
    with pytest.raises(DataError) as info:
        read_dataset_dir(d)
    assert info.value.problems == [
        f"{d}/preferences.jsonl:3: user u1, question 'q1': conflicts with {d}/preferences.jsonl:1 "
        "(chosen and rejected swapped)"
    ]
    assert "1 conflicting records" in str(info.value)
    prefs, _, reports = read_dataset_dir(d, on_duplicate="first")
    assert prefs == [P1, P2, P3]
    assert reports[0].dropped == [
        f"{d}/preferences.jsonl:3: conflicts with line 1 (user u1, question 'q1': chosen and rejected "
        "swapped); kept line 1"
    ]
    prefs, _, reports = read_dataset_dir(d, on_duplicate="last")
    assert prefs == [swapped, P2, P3]  # the last label, where the first one stood
    assert reports[0].dropped[0].startswith(f"{d}/preferences.jsonl:1: conflicts with line 3 ")


def test_other_metadata_is_a_conflict_and_other_users_are_not(tmp_path: Path) -> None:
    relabelled = pref("u1", "q1", "red", "blue", margin=0.5)
    d = folder(tmp_path, [P1, P3, relabelled, pref("u2", "q1", "red", "blue")], [U1, U2])
    with pytest.raises(DataError) as info:
        read_dataset_dir(d)
    # u2's swapped q1 conflicts with u2's own line 2 only; u1's line 3 differs from line 1 in metadata
    assert [p.split(": conflicts with ")[0] for p in info.value.problems] == [
        f"{d}/preferences.jsonl:3: user u1, question 'q1'",
        f"{d}/preferences.jsonl:4: user u2, question 'q1'",
    ]
    assert info.value.problems[0].endswith("(metadata.margin differs)")


def test_conflicts_of_both_files_come_in_one_error(tmp_path: Path) -> None:
    d = folder(tmp_path, [P1, pref("u1", "q1", "blue", "red")], [U1, User(user_id="u1")])
    with pytest.raises(DataError) as info:
        read_dataset_dir(d)
    assert [p.split(":")[0] for p in info.value.problems] == [
        f"{d}/preferences.jsonl",
        f"{d}/users.jsonl",
    ]


def test_parquet_repeats_are_named_by_row(tmp_path: Path) -> None:
    d = tmp_path / "pq"
    d.mkdir()
    write_records(d / "preferences.parquet", [P1, P3, P1])
    prefs, _, reports = read_dataset_dir(d)
    assert prefs == [P1, P3]
    assert reports[0].dropped == [
        f"{d}/preferences.parquet:row 3: duplicate of row 1 (user u1, question 'q1'); kept row 1"
    ]


def test_unknown_policy_names_the_option(tmp_path: Path) -> None:
    d = folder(tmp_path, [P1], [U1])
    with pytest.raises(UserError, match=r"--on-duplicate must be one of error, first, last, got 'newest'"):
        read_dataset_dir(d, on_duplicate="newest")


# --- the in-memory safety net of build_episodes ---


def test_build_episodes_names_what_it_drops() -> None:
    users = toy_users(2)
    prefs = toy_preferences(users, per_user=4)
    prefs.insert(2, prefs[0])
    users.append(users[0].model_copy(update={"description": "another"}))
    result = build_episodes(prefs, users, shots=1, test_user_fraction=0.0, heldout_per_user=0)
    assert result.report.duplicate_items == ["preferences[2] (u0): same as preferences[0]"]
    lines = result.report.lines(1)
    assert "ignored 1 duplicate preferences (same user, question and answers): preferences[2] (u0): " in (
        "\n".join(lines)
    )
    assert "1 user ids have more than one User record; the last of each is used: u0 (users[0], users[2])" in (
        lines
    )
    assert {e.description for e in result["train"] if e.user_id == "u0"} == {"another"}


# --- the CLI ---


def fspo(*args: object, cwd: Path) -> tuple[int, str]:
    done = subprocess.run(
        FSPO_CLI + [str(a) for a in args], env=CLI_ENV, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    return done.returncode, " ".join((done.stdout + done.stderr).split())


def test_cli_episodes_policy(tmp_path: Path) -> None:
    users = toy_users(3)
    prefs = toy_preferences(users, per_user=5)
    swapped = prefs[1].model_copy(update={"chosen": prefs[1].rejected, "rejected": prefs[1].chosen})
    d = folder(tmp_path, [*prefs, swapped, prefs[3]], [*users, users[2]])
    base = ["data", "episodes", "--data", d, "--shots", "1", "--heldout-per-user", "1"]

    code, out = fspo(*base, "--out", tmp_path / "e1", cwd=tmp_path)
    assert code == 2 and "Traceback" not in out, out
    assert f"{d}/preferences.jsonl:16: user u0, question 'Which " in out
    assert f"conflicts with {d}/preferences.jsonl:2 (chosen and rejected swapped)" in out
    assert "--on-duplicate first|last" in out
    assert not (tmp_path / "e1").exists()

    code, out = fspo(*base, "--out", tmp_path / "e2", "--on-duplicate", "last", cwd=tmp_path)
    assert code == 0, out
    assert f"{d}/preferences.jsonl:2: conflicts with line 16 (user u0, question " in out
    assert f"{d}/preferences.jsonl:17: duplicate of line 4 (user u0, question " in out
    assert f"{d}/users.jsonl:4: duplicate of line 3 (user u2); kept line 3" in out
    meta = json.loads((tmp_path / "e2" / "meta.json").read_text())
    assert meta["dropped_duplicate_records"] == 3 and meta["report"]["duplicates"] == 0
    used = [  # every use of that question, as a shot or a query, in every split
        p
        for split in ("train", "test_seen", "test_unseen")
        for line in (tmp_path / "e2" / f"{split}.jsonl").read_text().splitlines()
        for p in [*json.loads(line)["shots"], json.loads(line)["query"]]
        if p["user_id"] == "u0" and p["question"] == prefs[1].question
    ]
    assert used and {p["chosen"] for p in used} == {swapped.chosen}  # "last": only the swapped label is used

    code, out = fspo(*base, "--out", tmp_path / "e3", "--on-duplicate", "newest", cwd=tmp_path)
    assert code == 2 and "Traceback" not in out, out
    assert "--on-duplicate must be one of error, first, last, got 'newest'" in out


def test_cli_serve_import_of_a_folder_takes_the_policy(tmp_path: Path) -> None:
    from fspo.serve.store import Store

    d = folder(tmp_path, [P1, P2, pref("u1", "q1", "blue", "red"), P3], [U1, U2])
    db = f"sqlite:///{tmp_path / 'store.db'}"
    code, out = fspo("serve", "import", d, "--db", db, cwd=tmp_path)
    assert code == 2 and "Traceback" not in out, out
    assert f"{d}/preferences.jsonl:3: user u1, question 'q1': conflicts with {d}/preferences.jsonl:1" in out
    code, out = fspo("serve", "import", d, "--db", db, "--on-duplicate", "first", cwd=tmp_path)
    assert code == 0, out
    assert f"note: {d}/preferences.jsonl:3: conflicts with line 1 " in out
    with Store(db) as store:
        assert store.export_preferences() == [P1, P2, P3]

    one = write_jsonl(tmp_path / "one.jsonl", [P1, P2, P1])  # a single file: the same check
    db = f"sqlite:///{tmp_path / 'store2.db'}"
    code, out = fspo("serve", "import", one, "--db", db, cwd=tmp_path)
    assert code == 0, out
    assert f"note: {one}:3: duplicate of line 1 (user u1, question 'q1'); kept line 1" in out
    with Store(db) as store:
        assert store.export_preferences() == [P1, P2]


# --- JSON errors name the file, the line and the true column ---


def test_json_errors_name_line_and_column(tmp_path: Path) -> None:
    good = json.dumps(P1.model_dump())
    broken = '{"user_id": "u1", "question": "q", "chosen": "a" "rejected": "b"}'
    column = broken.index('"rejected"') + 1
    path = tmp_path / "p.jsonl"
    path.write_text(f"{good}\n{good}\n{broken}\n")
    with pytest.raises(DataError) as info:
        read_records(path, Preference)
    assert info.value.problems == [
        f"{path}:3: record: broken JSON: Expecting ',' delimiter (column {column})"
    ]

    array = tmp_path / "p.json"
    array.write_text(f"[\n  {good},\n  {broken}\n]\n")
    with pytest.raises(DataError, match=rf"^{array}:3: column {column + 2}: broken JSON: Expecting ','"):
        read_records(array, Preference)
    array.write_bytes(f"[\n  {good},\n  ".encode() + b'{"user_id": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=rf"^{array}:3: column 19: not UTF-8 text \(byte 0xe9\)"):
        read_records(array, Preference)
    array.write_text(f'[\n  {good},\n  {{"user_id": 1}}\n]\n')
    with pytest.raises(DataError) as info:
        read_records(array, Preference)
    assert info.value.problems[0].startswith(f"{array}:record 2: ")

    # a byte that is not UTF-8: the column counts characters (the "é" before it is 2 bytes, 1 column)
    path.write_bytes(f"{good}\n".encode() + '{"user_id": "né'.encode() + b'\xe9"}\n')
    with pytest.raises(DataError) as info:
        read_records(path, Preference)
    assert info.value.problems == [f"{path}:2: record: not valid UTF-8 (byte 0xe9 at column 16)"]
    array.write_bytes(f"[\n  {good},\n  ".encode() + '{"user_id": "né'.encode() + b'\xe9"}\n]\n')
    with pytest.raises(DataError, match=rf"^{array}:3: column 18: not UTF-8 text \(byte 0xe9\)"):
        read_records(array, Preference)
