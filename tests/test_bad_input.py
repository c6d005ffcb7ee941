"""Bad input through the real `fspo` command, one process per case (forked from one that imported fspo
once: tests/cli_fork.py): every command family must answer
a mistake with a non-zero exit status and one message naming the file, line, field or option at fault,
never a traceback, and must leave every file it was given exactly as it was.

Each case runs in its own folder (also its working directory, so a default output lands there too);
the sha256 of every file under it is taken before and after, and a case that may create files names
them. The shared inputs (a tiny model, toy episodes, users, generations) are built once and hashed
before and after the whole table. The cases run two at a time in one module fixture; each case is then
its own test, so a failure names it.
"""

from __future__ import annotations

import hashlib
import queue
import shlex
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_fork import ForkedCLI
from conftest import generations, tiny_llama_dir, write_jsonl
from fspo.testing import toy_corpus, toy_episodes, toy_preferences, toy_users

CASE_TIMEOUT_S = 90


@dataclass(frozen=True)
class Case:
    """`args` is a command line after `fspo`, formatted with `s` (the shared folder) and `c` (the case's
    folder); `files` are written into the case's folder first (bytes, text, or a function of the case
    folder and the shared folder); `expect` must appear in the output; `creates` names the paths (relative
    to the case folder) the command may create."""

    id: str
    args: str
    expect: str
    files: dict[str, bytes | str | Callable[[Path, Path], None]] = field(default_factory=dict)
    creates: tuple[str, ...] = ()


def _copy_model(name: str, drop: tuple[str, ...] = (), cut: str | None = None):
    """A setup that copies the shared model into the case folder as `name`, without the files `drop`
    and with the first half only of the file `cut` (what a killed download or save leaves)."""

    def make(case: Path, shared: Path) -> None:
        target = case / name
        shutil.copytree(shared / "model", target)
        for f in drop:
            (target / f).unlink()
        if cut is not None:
            data = (target / cut).read_bytes()
            (target / cut).write_bytes(data[: len(data) // 2])

    return make


def _truncated(source: str, keep_lines: int, target: str | None = None):
    """A setup writing the shared JSONL `source` cut after `keep_lines` whole lines and half the next,
    as `target` in the case folder (default: the same name)."""

    def make(case: Path, shared: Path) -> None:
        lines = (shared / source).read_text().splitlines(keepends=True)
        cut = lines[keep_lines][: len(lines[keep_lines]) // 2]
        (case / (target or source)).write_text("".join(lines[:keep_lines]) + cut)

    return make


REVIEW_HEADER = "prompt,chosen,rejected,user_id\n"
LATIN1_CSV = (REVIEW_HEADER + "Is it good?,Très bien,Bad,u1\n").encode("latin-1")
SYNTH_CONFIG = (Path(__file__).parents[1] / "configs" / "synth" / "roleplay.yaml").read_text()

# Command lines several cases share (each case adds what it gets wrong).
SYNTH_RUN = "synth run {c}/cfg.yaml --out {c}/run"
TRAIN_CONFIG = "train fspo --model {s}/model --episodes {s}/train.jsonl --out {c}/run --config {c}/t.yaml"
GENERATE = "generate --model {s}/model --episodes {s}/episodes.jsonl"
ACCURACY = "eval accuracy --model {s}/model --episodes {s}/episodes.jsonl --shots 0"
WINRATE = "eval winrate --a {s}/a.jsonl --b {s}/b.jsonl --users {s}/users.jsonl"
REPORT = "report {c}/run --out {c}/rep"
MODEL_INIT = "model init --out {c}/m --sim-domain roleplay"
SERVE = "serve --model {s}/model --db sqlite:///{c}/s.db --port 0"


def _unusable_out(name: str, command: str) -> list[Case]:
    """`command` with an `--out` nothing can be written to (under /proc), and one where a folder stands."""
    return [
        Case(f"{name}-out-unwritable", f"{command} --out /proc/x", "/proc/x"),
        Case(
            f"{name}-out-is-folder", f"{command} --out {{c}}/outdir", "outdir", files={"outdir/keep.txt": "x"}
        ),
    ]


CASES: list[Case] = [
    # --- data
    Case("validate-missing-file", "data validate {c}/nope.jsonl --kind episode", "nope.jsonl"),
    Case(
        "validate-bad-json-line",
        "data validate {c}/bad.jsonl --kind user",
        "bad.jsonl:2",
        files={"bad.jsonl": '{"user_id": "u1", "description": "d"}\n{"user_id": \n'},
    ),
    Case(
        "validate-missing-field",
        "data validate {c}/bad.jsonl --kind user",
        "bad.jsonl:1",
        files={"bad.jsonl": '{"description": "no id"}\n'},
    ),
    Case(
        "validate-latin1-jsonl",
        "data validate {c}/users.jsonl --kind user",
        "users.jsonl",
        files={"users.jsonl": '{"user_id": "u1", "description": "Très"}\n'.encode("latin-1")},
    ),
    Case("validate-unknown-kind", "data validate {s}/users.jsonl --kind banana", "banana"),
    Case(
        "validate-folder-as-file", "data validate {c}/adir --kind user", "adir", files={"adir/keep.txt": "x"}
    ),
    Case(
        "import-latin1-csv",
        "data import {c}/review.csv -f review -o {c}/out",
        "review.csv:2",
        files={"review.csv": LATIN1_CSV},
    ),
    Case(
        "import-unknown-format",
        "data import {c}/review.csv -f banana -o {c}/out",
        "banana",
        files={"review.csv": REVIEW_HEADER},
    ),
    Case("import-missing-file", "data import {c}/nope.csv -f review -o {c}/out", "nope.csv"),
    Case(
        "import-csv-missing-column",
        "data import {c}/review.csv -f review -o {c}/out",
        "review.csv",
        files={"review.csv": "prompt,chosen\nq,a\n"},
    ),
    Case("episodes-missing-data", "data episodes -d {c}/nodata -n 2 -o {c}/eps", "nodata"),
    Case(
        "episodes-truncated-preferences",
        "data episodes -d {c}/data -n 2 -o {c}/eps",
        "preferences.jsonl:3",
        files={
            "data/users.jsonl": lambda c, s: shutil.copy(s / "data" / "users.jsonl", c / "data"),
            "data/preferences.jsonl": _truncated("data/preferences.jsonl", 2),
        },
    ),
    Case("episodes-negative-shots", "data episodes -d {s}/data -n -1 -o {c}/eps", "shots"),
    Case(
        "episodes-bad-fraction",
        "data episodes -d {s}/data -n 2 -o {c}/eps --test-user-fraction 1.5",
        "test_user_fraction",
    ),
    # --- sim
    Case("sim-unknown-domain", "sim run --domain banana --out {c}/sim", "banana"),
    Case("sim-zero-users", "sim run --users 0 --out {c}/sim", "users"),
    Case("sim-option-not-key-value", "sim run --users 2 --option margin --out {c}/sim", "margin"),
    Case("sim-unknown-option", "sim run --users 2 --option nosuch=1 --out {c}/sim", "nosuch"),
    # --- synth
    Case("synth-missing-config", "synth run {c}/nope.yaml --out {c}/run", "nope.yaml"),
    Case("synth-unknown-field", SYNTH_RUN, "bananas", files={"cfg.yaml": SYNTH_CONFIG + "\nbananas: 3\n"}),
    Case(
        "synth-wrong-type",
        SYNTH_RUN,
        "count",
        files={"cfg.yaml": SYNTH_CONFIG.replace("count:", "count: many\n  old_count:", 1)},
    ),
    Case("synth-yaml-syntax", SYNTH_RUN, "cfg.yaml", files={"cfg.yaml": "name: [unclosed\n"}),
    # --- model
    Case("model-init-negative-pretrain", MODEL_INIT + " --pretrain-steps -5", "pretrain-steps"),
    Case("model-init-unknown-size", MODEL_INIT + " --size huge", "huge"),
    Case("model-init-missing-corpus", "model init --out {c}/m --corpus {c}/nope.txt", "nope.txt"),
    Case("model-import-missing-gguf", "model import {c}/nope.gguf --out {c}/m", "nope.gguf"),
    Case(
        "model-import-not-gguf",
        "model import {c}/fake.gguf --out {c}/m",
        "fake.gguf",
        files={"fake.gguf": b"not a gguf file at all"},
    ),
    Case(
        "model-no-tokenizer",
        "generate --model {c}/m --episodes {s}/episodes.jsonl --out {c}/g.jsonl",
        "no tokenizer files",
        files={"m": _copy_model("m", drop=("tokenizer.json", "tokenizer_config.json"))},
    ),
    Case(
        "model-half-written-weights",
        "generate --model {c}/m --episodes {s}/episodes.jsonl --out {c}/g.jsonl",
        "model.safetensors",
        files={"m": _copy_model("m", cut="model.safetensors")},
    ),
    # --- train
    Case(
        "train-missing-episodes",
        "train sft --model {s}/model --episodes {c}/nope.jsonl --out {c}/run",
        "nope.jsonl",
    ),
    Case("train-bad-config-field", TRAIN_CONFIG, "bananas", files={"t.yaml": "lr: 0.001\nbananas: 3\n"}),
    Case("train-config-wrong-type", TRAIN_CONFIG, "lr", files={"t.yaml": "lr: fast\n"}),
    Case(
        "train-missing-config",
        "train sft --model {s}/model --episodes {s}/train.jsonl --out {c}/run --config {c}/nope.yaml",
        "nope.yaml",
    ),
    Case(
        "train-lora-unknown-module",
        "train sft --model {s}/model --episodes {s}/train.jsonl --out {c}/run --lora "
        "--lora-target-modules nosuch_proj --max-steps 1",
        "nosuch_proj",
    ),
    Case(
        "train-out-is-file",
        "train sft --model {s}/model --episodes {s}/train.jsonl --out {c}/run.txt",
        "run.txt",
        files={"run.txt": "not a folder"},
    ),
    Case(
        "train-unknown-loss",
        "train fspo --model {s}/model --episodes {s}/train.jsonl --out {c}/run --loss banana",
        "field 'loss'",
    ),
    Case(
        "train-truncated-episodes",
        "train sft --model {s}/model --episodes {c}/train.jsonl --out {c}/run",
        "train.jsonl:3",
        files={"train.jsonl": _truncated("train.jsonl", 2)},
        # the trainer saves the run's config (a new file in a new folder) before it reads the episodes
    ),
    # --- generate
    *_unusable_out("generate", GENERATE),
    Case(
        "generate-truncated-episodes",
        "generate --model {s}/model --episodes {c}/episodes.jsonl --out {c}/g.jsonl",
        "episodes.jsonl:4",
        files={"episodes.jsonl": _truncated("episodes.jsonl", 3)},
    ),
    Case(
        "generate-missing-model",
        "generate --model {c}/nomodel --episodes {s}/episodes.jsonl --out {c}/g.jsonl",
        "nomodel",
    ),
    Case("generate-unknown-mode", GENERATE + " --out {c}/g.jsonl --mode banana", "banana"),
    # --- eval accuracy
    *_unusable_out("accuracy", ACCURACY),
    Case(
        "accuracy-bad-shots",
        "eval accuracy --model {s}/model --episodes {s}/episodes.jsonl --shots one,two",
        "shots",
    ),
    Case(
        "accuracy-truncated-episodes",
        "eval accuracy --model {s}/model --episodes {c}/episodes.jsonl --shots 0 --out {c}/acc.json",
        "episodes.jsonl:2",
        files={"episodes.jsonl": _truncated("episodes.jsonl", 1)},
    ),
    Case("accuracy-missing-ref", ACCURACY + " --ref {c}/noref --out {c}/acc.json", "noref"),
    # --- eval winrate
    Case(
        "winrate-truncated-a",
        "eval winrate --a {c}/a.jsonl --b {s}/b.jsonl --users {s}/users.jsonl --out {c}/w.json",
        "a.jsonl:3",
        files={"a.jsonl": _truncated("a.jsonl", 2)},
    ),
    *_unusable_out("winrate", WINRATE),
    Case("winrate-out-under-a-file", WINRATE + " --out {c}/f.txt/w.json", "f.txt", files={"f.txt": "x"}),
    Case(
        "winrate-missing-users",
        "eval winrate --a {s}/a.jsonl --b {s}/b.jsonl --users {c}/nope.jsonl --out {c}/w.json",
        "nope.jsonl",
    ),
    Case("winrate-unknown-judge", WINRATE + " --judge banana --out {c}/w.json", "banana"),
    # --- report
    Case(
        "report-truncated-result",
        REPORT,
        "winrate.json",
        files={"run/winrate.json": '{"system": "fspo", "opponent": "base", "win'},
    ),
    Case(
        "report-truncated-generations",
        REPORT,
        "gen.jsonl:3",
        files={"run/gen.jsonl": _truncated("a.jsonl", 2, "run/gen.jsonl")},
    ),
    Case(
        "report-winrate-wrong-shape",
        REPORT,
        "winrate.json",
        files={"run/winrate.json": '{"kind": "fspo.winrate", "results": [{"system": 1}]}'},
    ),
    Case("report-missing-run-dir", "report {c}/norun --out {c}/rep", "norun"),
    # --- serve / study
    Case("serve-bad-db-url", "serve --model {s}/model --db notaurl --port 0", "notaurl"),
    Case("serve-missing-study", SERVE + " --study {c}/nope.yaml", "nope.yaml"),
    Case("serve-bad-baseline", SERVE + " --baseline justaname", "justaname"),
    Case("serve-keys-bad-db-url", "serve keys list --db notaurl", "notaurl"),
    Case("study-report-bad-db-url", "study report --db notaurl", "notaurl"),
    Case(
        "study-report-missing-study",
        "study report --db sqlite:///{c}/s.db --study {c}/nope.yaml",
        "nope.yaml",
    ),
    # --- quickstart
    Case("quickstart-unknown-profile", "quickstart --profile banana --out {c}/qs", "banana"),
]


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Outcome:
    code: int
    output: str
    before: dict[str, str]
    after: dict[str, str]


def _run(case: Case, shared: Path, folder: Path, runners: queue.Queue[ForkedCLI]) -> Outcome:
    folder.mkdir(parents=True)
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(folder, shared)
            continue
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _hashes(folder)
    args = shlex.split(case.args.format(s=shared, c=folder))
    runner = runners.get()
    try:
        code, output = runner.run(args, folder, CASE_TIMEOUT_S)
    finally:
        runners.put(runner)
    if code is None:
        code, output = 0, f"still running after {CASE_TIMEOUT_S} s: {output!r}"
    return Outcome(code, output, before, _hashes(folder))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, test and train episodes, users, preferences (a data folder) and two systems'
    generations: the good inputs the bad ones sit beside."""
    root = tmp_path_factory.mktemp("bad_input_shared")
    users = toy_users(4)
    test = [e.model_copy(update={"split": "test_seen"}) for e in toy_episodes(users, per_user=2, shots=2)]
    train = toy_episodes(users, per_user=3, shots=2, seed=1)
    write_jsonl(root / "episodes.jsonl", test)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "users.jsonl", users)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "users.jsonl", users)
    write_jsonl(root / "data" / "preferences.jsonl", toy_preferences(users, per_user=4))
    write_jsonl(root / "a.jsonl", generations(test, "fspo", lambda e: "a red answer"))
    write_jsonl(root / "b.jsonl", generations(test, "base", lambda e: "a plain answer"))
    tiny_llama_dir(root / "model", toy_corpus(test + train))
    return root


@pytest.fixture(scope="module")
def outcomes(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case run, two at a time; the shared inputs must be unchanged afterwards."""
    cases_root = tmp_path_factory.mktemp("bad_input_cases")
    before = _hashes(shared)
    runners: queue.Queue[ForkedCLI] = queue.Queue()
    for _ in range(2):
        runners.put(ForkedCLI(tmp_path_factory.mktemp("cli_output")))
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = {c.id: pool.submit(_run, c, shared, cases_root / c.id, runners) for c in CASES}
            results = {name: f.result() for name, f in futures.items()}
    finally:
        while not runners.empty():
            runners.get().close()
    assert _hashes(shared) == before, "a case changed a shared input"
    return results


def test_table_is_large_and_ids_unique() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, outcomes: dict[str, Outcome]) -> None:
    result = outcomes[case.id]
    shown = f"exit {result.code}:\n{result.output[-3000:]}"
    assert result.code != 0, shown
    assert "Traceback" not in result.output, shown
    assert case.expect in " ".join(result.output.split()), shown
    changed = {
        name
        for name in result.before.keys() | result.after.keys()
        if result.before.get(name) != result.after.get(name)
    }
    allowed = {name for name in changed if any(name == p or name.startswith(p + "/") for p in case.creates)}
    assert changed == allowed, f"files changed or created: {sorted(changed - allowed)}\n{shown}"


# --- files fspo did not make, and inputs that do not fit together (tests/test_consistency.py has more) ---


def _other_apps_db(case: Path, shared: Path) -> None:
    """A SQLite file of another application (its own table, the default rollback journal)."""
    import sqlite3

    conn = sqlite3.connect(case / "other_app.db")
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
    conn.commit()
    conn.close()


# A GGUF header cut short: magic, version 3, 5 tensors and 10 metadata entries announced, one byte more.
GGUF_CUT = (
    b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (10).to_bytes(8, "little") + b"\x05"
)

CASES.extend(
    [
        # the bytes of the file, its journal mode included, are checked unchanged, and no -wal/-shm is made
        Case(
            "serve-keys-other-apps-db",
            "serve keys create --user u --db sqlite:///{c}/other_app.db",
            "the database holds tables fspo did not make (orders)",
            files={"other_app.db": _other_apps_db},
        ),
        Case(
            "serve-keys-db-not-sqlite",
            "serve keys create --user u --db sqlite:///{c}/notes.db",
            "notes.db is not a SQLite database",
            files={"notes.db": "my notes, not a database\n"},
        ),
        Case(
            "model-import-gguf-magic-only",
            "model import {c}/h.gguf --out {c}/m",
            "h.gguf: not a complete GGUF file (4 bytes): it is cut short or damaged",
            files={"h.gguf": b"GGUF"},
        ),
        Case(
            "model-import-gguf-cut-short",
            "model import {c}/c.gguf --out {c}/m",
            "c.gguf: not a complete GGUF file (25 bytes)",
            files={"c.gguf": GGUF_CUT},
        ),
        Case(
            "winrate-same-file-twice", WINRATE.replace("b.jsonl", "a.jsonl"), "--a and --b are the same file"
        ),
        Case(
            "generate-rat-without-shots",
            GENERATE + " --out {c}/g.jsonl --mode rat --shots 0",
            "--mode rat --shots 0",
        ),
    ]
)


# --- repeated records in a data folder (tests/test_duplicates.py has the policy itself) ---


def _data_with_repeat(name: str, make_line: Callable[[dict], dict]):
    """A setup copying the shared data folder as `data`, with one more line in `name`: `make_line` of
    that file's first record (a record that conflicts with line 1)."""

    def make(case: Path, shared: Path) -> None:
        import json

        shutil.copytree(shared / "data", case / "data")
        path = case / "data" / name
        first = json.loads(path.read_text().splitlines()[0])
        with open(path, "a") as f:
            f.write(json.dumps(make_line(first)) + "\n")

    return make


CASES.extend(
    [
        Case(
            "episodes-conflicting-users",
            "data episodes -d {c}/data -n 2 -o {c}/eps",
            "users.jsonl:5: user u0: conflicts with",
            files={"data": _data_with_repeat("users.jsonl", lambda r: {**r, "description": "another"})},
        ),
        Case(
            "episodes-swapped-preference",
            "data episodes -d {c}/data -n 2 -o {c}/eps",
            "(chosen and rejected swapped)",
            files={
                "data": _data_with_repeat(
                    "preferences.jsonl", lambda r: {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                )
            },
        ),
        Case(
            "episodes-unknown-duplicate-policy",
            "data episodes -d {s}/data -n 2 -o {c}/eps --on-duplicate newest",
            "--on-duplicate must be one of error, first, last",
        ),
    ]
)


# --- `data validate` applies the rules of the readers further on (serve import, data episodes) ---

CASES.extend(
    [
        Case(
            "validate-nan-in-metadata",
            "data validate {c}/users.jsonl --kind user",
            "users.jsonl:1: metadata.score: nan is not a finite number",
            files={"users.jsonl": '{"user_id": "u1", "metadata": {"score": NaN}}\n'},
        ),
        Case(
            "validate-nul-in-question",
            "data validate {c}/prefs.jsonl --kind preference",
            "prefs.jsonl:1: question: contains a NUL character",
            files={
                "prefs.jsonl": '{"user_id": "u1", "question": "a\\u0000b", "chosen": "x", "rejected": "y"}\n'
            },
        ),
        Case(
            "validate-user-with-two-descriptions",
            "data validate {c}/users.jsonl --kind user",
            "users.jsonl:2: user u1: conflicts with",
            files={
                "users.jsonl": '{"user_id": "u1", "description": "likes red"}\n'
                '{"user_id": "u1", "description": "likes blue"}\n'
            },
        ),
    ]
)
