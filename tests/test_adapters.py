"""Importers of the paper's released datasets, on small fixture files in the three file formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import data_cli
from fspo.core.errors import DataError, UserError
from fspo.data.adapters import import_released
from fspo.data.schema import Preference

FIXTURES = Path(__file__).parent / "fixtures"


def test_roleplay_jsonl() -> None:
    result = import_released(FIXTURES / "roleplay.jsonl", "roleplay")
    assert result.rows == 5 and len(result.preferences) == 5 and result.notes == []
    first = result.preferences[0]
    assert first == Preference(
        user_id="7",
        question="How should I spend a free Saturday?",
        chosen="Go for a long hike and pack a picnic.",
        rejected="Stay in and binge a TV series.",
        metadata={"score_persona": "An outdoorsy retiree who loves nature.", "persona_id": "p7"},
    )
    users = {u.user_id: u for u in result.users}
    assert set(users) == {"7", "12"}
    assert users["12"].description == "A teenage gamer who loves tech."
    assert [p.user_id for p in result.preferences].count("12") == 2


def test_review_csv_label_semantics_and_interpolated_users() -> None:
    result = import_released(FIXTURES / "review.csv", "review")
    by_user = {p.user_id: p for p in result.preferences}
    # label 0: response_x preferred; label 1: response_y preferred.
    assert by_user["positive"].chosen == "A heartfelt, gorgeous film. Loved it."
    assert by_user["positive"].rejected == "Overlong and sentimental."
    assert by_user["negative"].chosen == "Overlong and sentimental."
    assert by_user["negative"].rejected == "A heartfelt, gorgeous film. Loved it."
    # CSV quoting: embedded quotes, commas and a newline inside a cell.
    assert by_user["positive"].question == 'Review the movie "Up".'
    assert by_user["concise"].rejected.endswith("the sauce bright,\nand the service warm; I will return.")
    assert by_user["concise"].metadata == {
        "label": 0,
        "level_x": "concise",
        "level_y": "verbose",
        "model_name_x": "gpt",
    }
    users = {u.user_id: u for u in result.users}
    assert users["positive+concise"].description == "This user prefers positive and concise reviews."
    assert users["negative"].description == "This user prefers negative reviews."
    assert users["positive+concise"].metadata["split"] == "test"
    assert users["positive"].metadata["split"] == "train"
    # The rejected answer's level (level_y for label 0, level_x for label 1) describes its persona.
    assert by_user["positive"].rejected_description == "This user prefers negative reviews."
    assert by_user["negative"].rejected_description == "This user prefers positive reviews."
    assert by_user["concise"].rejected_description == "This user prefers verbose reviews."


@pytest.mark.parametrize("name", ["elix.parquet", "elix.jsonl"])
def test_elix_scorer_match_filter_is_reported(name: str) -> None:
    result = import_released(FIXTURES / name, "elix")
    assert (result.rows, result.filtered, len(result.preferences)) == (4, 1, 3)
    assert "1 of 4 rows left out" in result.notes[0]
    users = {u.user_id: u.description for u in result.users}
    assert users == {
        "an elementary school student": "The user is an elementary school student.",
        "an expert": "The user is an expert.",
    }
    expert = [p for p in result.preferences if p.user_id == "an expert"]
    assert [p.chosen for p in expert] == [
        "Rayleigh scattering scales with the inverse fourth power of wavelength.",
        "A region bounded by an event horizon in a Schwarzschild spacetime.",
    ]
    assert [p.rejected_description for p in expert] == ["The user is an elementary school student."] * 2
    everything = import_released(FIXTURES / name, "elix", scorer_match=False)
    assert len(everything.preferences) == 4 and everything.notes == []
    assert everything.preferences[3].user_id == "a high school student"


def test_bad_rows_name_file_row_and_column(tmp_path: Path) -> None:
    good = {"prompt": "p", "response_x": "a", "response_y": "b", "label": 0, "scorer_level": "s"}
    rows = [
        good,
        {**good, "label": 2},
        {k: v for k, v in good.items() if k != "response_y"},
        {**good, "prompt": None},
        {**good, "response_x": "b"},
        {**good, "response_x": 5},
    ]
    path = tmp_path / "review.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    with pytest.raises(DataError) as info:
        import_released(path, "review")
    assert info.value.problems == [
        f"{path}:2: label: must be 0 (response_x preferred) or 1 (response_y preferred), got 2",
        f"{path}:3: response_y: missing column",
        f"{path}:4: prompt: empty value",
        f"{path}:5: rejected: chosen and rejected answers are identical",
        f"{path}:6: response_x: expected text, got int 5",
        f"{path}:7: record: broken JSON: Expecting property name enclosed in double quotes (column 2)",
    ]


def test_bad_csv_cell_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "roleplay.csv"
    path.write_text("x,yw,yl,level,score_persona\nq,a,b,1,P\nq2,,b,1,P\n")
    with pytest.raises(DataError) as info:
        import_released(path, "roleplay")
    assert info.value.problems == [f"{path}:row 2: yw: empty value"]


def test_conflicting_personas_are_noted(tmp_path: Path) -> None:
    path = tmp_path / "rp.jsonl"
    rows = [
        {"x": "q1", "yw": "a", "yl": "b", "level": "u", "score_persona": "first"},
        {"x": "q2", "yw": "a", "yl": "b", "level": "u", "score_persona": "second"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = import_released(path, "roleplay")
    assert result.users[0].description == "first"
    assert result.notes == [
        f"user 'u': 1 rows carry a persona different from the one at {path}:1; kept the first"
    ]


def test_empty_file_and_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no rows"):
        import_released(tmp_path / "e.jsonl", "elix")
    with pytest.raises(
        UserError, match="unknown dataset format 'nope'; expected one of roleplay, review, elix"
    ):
        import_released(FIXTURES / "elix.jsonl", "nope")


def test_cli_import_writes_a_data_folder(tmp_path: Path) -> None:
    from fspo.data.io import read_dataset_dir

    code, out = data_cli("import", "--format", "elix", FIXTURES / "elix.parquet", "--out", tmp_path / "elix")
    assert code == 0
    assert "imported 3 preferences of 2 users from 4 rows" in out
    assert "1 of 4 rows left out by the official ELIX filter" in out
    prefs, users, _ = read_dataset_dir(tmp_path / "elix")
    assert len(prefs) == 3 and {u.user_id for u in users} == {"an expert", "an elementary school student"}
    code, out = data_cli(
        "import",
        "--format",
        "elix",
        FIXTURES / "elix.parquet",
        "--out",
        tmp_path / "all",
        "--no-scorer-match",
    )
    assert code == 0 and "imported 4 preferences of 3 users" in out


def test_cli_import_errors(tmp_path: Path) -> None:
    code, out = data_cli(
        "import", "--format", "rolepaly", FIXTURES / "roleplay.jsonl", "--out", tmp_path / "o"
    )
    assert code == 2 and "unknown dataset format 'rolepaly'" in out
    code, out = data_cli("import", "--format", "roleplay", FIXTURES / "review.csv", "--out", tmp_path / "o")
    assert (
        code == 2
        and f"{FIXTURES / 'review.csv'}: not a roleplay file: missing columns x, yw, yl, level" in out
    )
    assert not (tmp_path / "o").exists()  # nothing half-written
