"""Record files: round trips through JSONL and Parquet, and every kind of bad row named precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import data_cli
from fspo.core.errors import DataError, UserError
from fspo.data.io import (
    ReadReport,
    iter_records,
    read_dataset_dir,
    read_records,
    read_records_with_report,
    write_dataset_dir,
    write_records,
)
from fspo.data.schema import Episode, Preference, User


def pref(user: str = "u1", q: str = "q", c: str = "yes", r: str = "no", **meta) -> Preference:
    return Preference(user_id=user, question=q, chosen=c, rejected=r, metadata=meta)


def good_row(**over) -> dict:
    row = {"user_id": "u1", "question": "q?", "chosen": "a", "rejected": "b"}
    row.update(over)
    return row


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_round_trip_all_kinds(tmp_path: Path, suffix: str) -> None:
    prefs = [
        pref("u1", "q1", "a", "b", trait="kind", score=0.5),
        pref("u1", "q2", "ünïcode ✓", "b\nmultiline"),
        pref("u2", "q3", "x", "y", nested={"list": [1, 2], "none": None}),
    ]
    users = [User(user_id="u1", description="likes a", metadata={"split": "test"}), User(user_id="u2")]
    episodes = [
        Episode(
            episode_id="e1", user_id="u1", shots=prefs[:1], query=prefs[1], description="d", split="train"
        ),
        Episode(episode_id="e2", user_id="u1", shots=[], query=prefs[0], metadata={"pass": 3}),
    ]
    for kind, records in [(Preference, prefs), (User, users), (Episode, episodes)]:
        path = tmp_path / f"{kind.__name__}{suffix}"
        assert write_records(path, records) == len(records)
        assert read_records(path, kind) == records
        assert list(iter_records(path, kind)) == records
    # Metadata dicts with different keys per row survive Parquet exactly (stored as JSON text).
    assert read_records(tmp_path / f"Preference{suffix}", Preference)[2].metadata == {
        "nested": {"list": [1, 2], "none": None}
    }


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    write_records(path, [pref()])

    def boom():
        yield pref(q="other")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_records(path, boom())
    assert read_records(path, Preference) == [pref()]  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]


def test_json_array_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([good_row(), good_row(question="q2")]))
    assert [p.question for p in read_records(path, Preference)] == ["q?", "q2"]


def test_blank_lines_and_bom_are_not_records(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [b"\xef\xbb\xbf" + json.dumps(good_row()).encode(), "", "  "])
    report = ReadReport(str(path))
    assert len(read_records(path, Preference, report=report)) == 1
    assert report.total == 1 and report.skipped == 0


def test_every_bad_row_is_listed_with_file_line_and_field(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "bad.jsonl",
        [
            json.dumps(good_row()),  # 1 ok
            '{"user_id": "u1", "question": ',  # 2 broken JSON
            b'{"user_id": "u1", "question": "caf\xe9", "chosen": "a", "rejected": "b"}',  # 3 latin-1 byte
            json.dumps({k: v for k, v in good_row().items() if k != "chosen"}),  # 4 missing field
            json.dumps(good_row(question=123)),  # 5 wrong type
            json.dumps(good_row(chosen="   ")),  # 6 blank text
            json.dumps(good_row(chosen="same", rejected=" same ")),  # 7 identical answers
            json.dumps(good_row(colour="red")),  # 8 unknown field
            "[1, 2]",  # 9 not an object
            json.dumps(good_row(metadata="oops")),  # 10 metadata not an object
        ],
    )
    with pytest.raises(DataError) as info:
        read_records(path, Preference, skip_invalid=False)  # a caller that offers --skip-invalid
    problems = info.value.problems
    expected = [
        (2, "record", "broken JSON"),
        (3, "record", "not valid UTF-8"),
        (4, "chosen", "Field required"),
        (5, "question", "valid string"),
        (6, "chosen", "must not be empty"),
        (7, "rejected", "identical"),
        (8, "colour", "Extra inputs"),
        (9, "record", "expected a JSON object"),
        (10, "metadata", "valid dictionary"),
    ]
    assert len(problems) == len(expected)
    for problem, (line, field, text) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{path}:{line}: {field}: "), problem
        assert text in problem
    message = str(info.value)
    assert "9 of 10 Preference records are invalid" in message and "--skip-invalid" in message
    with pytest.raises(DataError) as info:
        read_records(path, Preference)  # one that does not: the message does not suggest it
    assert "--skip-invalid" not in str(info.value)


def test_skip_invalid_reports_what_it_skipped(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps(good_row()),
            "not json",
            json.dumps(good_row(rejected="")),
            json.dumps(good_row(question="2")),
        ],
    )
    records, report = read_records_with_report(path, Preference, skip_invalid=True)
    assert [r.question for r in records] == ["q?", "2"]
    assert (report.total, report.valid, report.skipped) == (4, 2, 2)
    assert report.problems[0].startswith(f"{path}:2: record: broken JSON")
    assert report.problems[1].startswith(f"{path}:3: rejected: ")
    assert "2 valid of 4 records, 2 skipped" in report.summary()


def test_nested_episode_errors_name_the_path(tmp_path: Path) -> None:
    shot = good_row()
    bad_shot = good_row(chosen="x", rejected="x")
    row = {"episode_id": "e", "user_id": "u1", "shots": [shot, bad_shot], "query": good_row(question="q2")}
    path = write_lines(tmp_path / "e.jsonl", [json.dumps(row)])
    with pytest.raises(DataError) as info:
        read_records(path, Episode)
    assert info.value.problems == [f"{path}:1: shots.1.rejected: chosen and rejected answers are identical"]


def test_parquet_bad_rows_name_the_row(tmp_path: Path) -> None:
    from datasets import Dataset

    path = tmp_path / "p.parquet"
    rows = [good_row(metadata="{}"), good_row(chosen="b", metadata="{}"), good_row(metadata="{not json")]
    Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        read_records(path, Preference)
    assert info.value.problems[0] == f"{path}:row 2: rejected: chosen and rejected answers are identical"
    assert info.value.problems[1].startswith(f"{path}:row 3: metadata: not valid JSON text")


def test_empty_and_missing_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        read_records(tmp_path / "empty.jsonl", Preference)
    write_records(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match="holds no records"):
        read_records(tmp_path / "empty.parquet", Preference)
    with pytest.raises(UserError, match="no such file"):
        read_records(tmp_path / "missing.jsonl", Preference)
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(UserError, match="unknown file type"):
        read_records(tmp_path / "p.txt", Preference)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot read the file"):
        read_records(tmp_path / "broken.parquet", Preference)


def test_dataset_folder_round_trip(tmp_path: Path) -> None:
    prefs = [pref("u1"), pref("u2", q="other")]
    users = [User(user_id="u1", description="d")]
    assert write_dataset_dir(tmp_path / "d", prefs, users) == (2, 1)
    got_prefs, got_users, reports = read_dataset_dir(tmp_path / "d")
    assert (got_prefs, got_users) == (prefs, users)
    assert [r.valid for r in reports] == [2, 1]
    write_records(tmp_path / "d" / "preferences.parquet", prefs)
    with pytest.raises(UserError, match="keep only one"):
        read_dataset_dir(tmp_path / "d")
    with pytest.raises(UserError, match="no such data folder"):
        read_dataset_dir(tmp_path / "nope")
    write_dataset_dir(tmp_path / "no_users", prefs, [])  # an empty users file is allowed
    assert read_dataset_dir(tmp_path / "no_users")[:2] == (prefs, [])


# --- the `fspo data validate` and `fspo data convert` commands ---


def test_cli_validate(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(good_row()), json.dumps(good_row(chosen=""))])
    code, out = data_cli("validate", path, "--kind", "preference")
    assert code == 2
    assert f"{path}:2: chosen: String should have at least 1 character" in out
    code, out = data_cli("validate", path, "--kind", "preference", "--skip-invalid")
    assert code == 0 and "1 valid preference records, 1 invalid" in out
    code, out = data_cli("validate", path, "--kind", "users")
    assert code == 2 and "--kind must be one of preference, user, episode" in out


def test_cli_convert_round_trip(tmp_path: Path) -> None:
    prefs = [pref("u1", trait="a"), pref("u2", q="q2", other=[1])]
    write_records(tmp_path / "preferences.jsonl", prefs)
    code, out = data_cli("convert", tmp_path / "preferences.jsonl", tmp_path / "preferences.parquet")
    assert code == 0 and "wrote 2 preference records" in out
    code, _ = data_cli(
        "convert", tmp_path / "preferences.parquet", tmp_path / "back.jsonl", "--kind", "preference"
    )
    assert code == 0
    assert (tmp_path / "back.jsonl").read_text() == (tmp_path / "preferences.jsonl").read_text()
    write_records(tmp_path / "data.jsonl", prefs)
    code, out = data_cli("convert", tmp_path / "data.jsonl", tmp_path / "x.parquet")
    assert code == 2 and "cannot tell the record kind" in out


def test_real_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    bad = write_lines(tmp_path / "p.jsonl", ["{nope"])
    code = "from fspo.cli import main; main()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "data", "validate", str(bad), "--kind", "preference"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:1: record: broken JSON" in proc.stderr
