"""Inputs that fit together badly: each is refused with one line before anything is written, or said on
the console, where going on would give a wrong result without a word.

- a database of another application is never changed (not its tables, not its journal mode); a
  migration holds a lock on the database's folder, which a database already at head never waits for;
- a model folder holding another model's tokenizer, and a reference model of another tokenizer;
- RAT asked of a model never trained for it, without shots, or scored on episodes without descriptions;
- one generations file as both systems of a win rate; a judge endpoint no pair needed;
- a copied folder of runs reads its own starting models, not the original's;
- shots dropped for the token budget are said when training starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI_ENV, FSPO_CLI, generations, tiny_llama_dir, write_jsonl
from fspo.core.errors import UserError
from fspo.data.schema import Episode
from fspo.testing import toy_corpus, toy_episodes, toy_users

CLI_TIMEOUT_S = 120


def fspo(*args: object, cwd: Path | None = None) -> tuple[int, str]:
    done = subprocess.run(
        FSPO_CLI + [str(a) for a in args],
        env=CLI_ENV,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    return done.returncode, done.stdout + done.stderr


def refused(code: int, output: str, expect: str) -> None:
    shown = f"exit {code}:\n{output[-3000:]}"
    assert code == 2, shown
    assert "Traceback" not in output, shown
    assert expect in " ".join(output.split()), shown


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------- serve database


def _foreign_db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
    conn.execute("INSERT INTO orders (item) VALUES ('tea')")
    conn.commit()
    conn.close()
    return path


def _journal_and_tables(path: Path) -> tuple[str, list[str]]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master ORDER BY name")]
    finally:
        conn.close()
    return mode, tables


def test_another_applications_database_is_refused_before_anything_is_written(tmp_path: Path):
    db = _foreign_db(tmp_path / "other_app.db")
    before, (mode, tables) = sha(db), _journal_and_tables(db)
    assert mode == "delete" and tables == ["orders"]
    code, out = fspo("serve", "keys", "create", "--user", "u", "--db", f"sqlite:///{db}")
    refused(code, out, "tables fspo did not make (orders)")
    assert sha(db) == before
    assert _journal_and_tables(db) == ("delete", ["orders"])  # not switched to WAL, no table added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_app.db"]  # no -wal, -shm or lock file


@pytest.mark.parametrize(
    "make, expect",
    [
        # fspo's own tables beside another application's
        (lambda c: c.execute("CREATE TABLE invoices (id INTEGER)"), "tables fspo did not make (invoices)"),
        # the revision table of another alembic-managed application (or of a newer fspo)
        (lambda c: c.execute("UPDATE alembic_version SET version_num = 'abc123'"), "revision 'abc123'"),
    ],
)
def test_an_fspo_database_changed_by_someone_else_is_refused(tmp_path: Path, make, expect: str):
    from fspo.serve.store import Store

    db = tmp_path / "serve.db"
    Store(f"sqlite:///{db}").close()
    conn = sqlite3.connect(db)
    make(conn)
    conn.commit()
    conn.close()
    before = sha(db)
    with pytest.raises(UserError, match="left unchanged") as err:
        Store(f"sqlite:///{db}")
    assert expect in str(err.value)
    assert sha(db) == before


def test_a_shared_server_database_keeps_other_tables_but_not_lookalikes():
    from sqlalchemy import create_engine, text

    from fspo.serve.store.database import check_ours

    engine = create_engine("sqlite://")  # stands in for a PostgreSQL database other applications share
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER)"))
        assert check_ours(conn, "db", whole=False) is None  # fspo's schema is not there yet: created beside
        with pytest.raises(UserError, match=r"tables fspo did not make \(invoices\)"):
            check_ours(conn, "db", whole=True)
        conn.execute(text("CREATE TABLE users (id INTEGER)"))
        with pytest.raises(UserError, match=r"named like fspo's but no alembic_version \(users\)"):
            check_ours(conn, "db", whole=False)


def _hold_folder_lock(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding an exclusive flock on `folder` for `seconds` (as a migration does)."""
    script = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_a_migration_waits_for_the_folder_lock_and_a_database_at_head_does_not(tmp_path: Path):
    from fspo.serve.store import Store, head_revision

    ready = tmp_path / "ready.db"
    Store(f"sqlite:///{ready}").close()
    holder = _hold_folder_lock(tmp_path, 1.5)
    try:
        t0 = time.monotonic()
        Store(f"sqlite:///{ready}").close()  # at head: nothing to migrate, no lock taken
        assert time.monotonic() - t0 < 1.0
        new = tmp_path / "new.db"
        Store(f"sqlite:///{new}").close()  # needs its schema: waits for the other process
        assert time.monotonic() - t0 >= 1.0
    finally:
        holder.wait(timeout=30)
    conn = sqlite3.connect(new)
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
    conn.close()


def test_processes_creating_one_database_at_once_all_succeed(tmp_path: Path):
    db = tmp_path / "serve.db"
    script = "import sys; from fspo.serve.store import Store; Store(sys.argv[1]).close()"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"sqlite:///{db}"], stderr=subprocess.PIPE, text=True, env=CLI_ENV
        )
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=CLI_TIMEOUT_S)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    conn = sqlite3.connect(db)
    assert len(conn.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
    conn.close()


# ------------------------------------------------------------------------------- models, tokenizers


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`model` (a tiny Llama on the toy corpus), `small` (one on a few words: a much smaller vocabulary),
    test episodes (`episodes.jsonl`, with descriptions) and the users."""
    root = tmp_path_factory.mktemp("consistency")
    users = toy_users(4)
    test = [e.model_copy(update={"split": "test_seen"}) for e in toy_episodes(users, per_user=2, shots=2)]
    write_jsonl(root / "episodes.jsonl", test)
    write_jsonl(root / "users.jsonl", users)
    tiny_llama_dir(root / "model", toy_corpus(test))
    tiny_llama_dir(root / "small", ["red blue green", "yellow answers"])
    return {
        "root": root,
        "model": root / "model",
        "small": root / "small",
        "episodes": root / "episodes.jsonl",
    }


def _vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def _with_tokenizer_of(source: Path, tokenizer_of: Path, target: Path) -> Path:
    """A copy of the model folder `source` holding the tokenizer files of `tokenizer_of`."""
    shutil.copytree(source, target)
    for f in tokenizer_of.glob("*token*"):
        shutil.copy(f, target / f.name)
    return target


@pytest.mark.parametrize("direction", ["smaller", "larger"])
def test_a_model_folder_with_another_models_tokenizer_is_refused(world, tmp_path: Path, direction: str):
    big, small = world["model"], world["small"]
    assert _vocab_size(small) < 0.9 * _vocab_size(big)  # the premise: two clearly different vocabularies
    model, tokenizer = (big, small) if direction == "smaller" else (small, big)
    folder = _with_tokenizer_of(model, tokenizer, tmp_path / "m")
    code, out = fspo(
        "generate", "--model", folder, "--episodes", world["episodes"], "--out", tmp_path / "g.jsonl"
    )
    refused(code, out, f"model folder '{folder}': the tokenizer has")
    assert "the tokenizer is another model's" in out
    assert not (tmp_path / "g.jsonl").exists()


def test_a_padded_embedding_is_not_a_misfit(world):
    from fspo.models.loading import load_tokenizer, tokenizer_misfit

    tok = load_tokenizer(world["model"])
    assert tokenizer_misfit(tok, len(tok)) is None
    assert tokenizer_misfit(tok, len(tok) + len(tok) // 50) is None  # padded by 2%: as real models are
    assert "far fewer" in (tokenizer_misfit(tok, len(tok) * 2) or "")
    assert "only" in (tokenizer_misfit(tok, len(tok) - 1) or "")


def _swapped_vocab(source: Path, target: Path) -> Path:
    """A copy of `source` whose tokenizer gives two ordinary tokens each other's ids: the same size, the
    same embedding, but some token ids mean other text."""
    shutil.copytree(source, target)
    data = json.loads((target / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = [t for t in vocab if t.isalpha() and len(t) > 2][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (target / "tokenizer.json").write_text(json.dumps(data))
    return target


@pytest.mark.parametrize("ref", ["small", "swapped"])
def test_accuracy_refuses_a_reference_of_another_tokenizer(world, tmp_path: Path, ref: str):
    folder = world["small"] if ref == "small" else _swapped_vocab(world["model"], tmp_path / "ref")
    out = tmp_path / "acc.json"
    code, output = fspo(
        "eval", "accuracy", "--model", world["model"], "--ref", folder, "--episodes", world["episodes"],
        "--shots", "0", "--out", out,
    )  # fmt: skip
    refused(code, output, f"--ref '{folder}' does not share the tokenizer of --model '{world['model']}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if ref == "small" else ["ref"])


def _trained_as(source: Path, target: Path, rat: str) -> Path:
    """A copy of `source` whose saved training config says it was trained with RAT mode `rat`."""
    shutil.copytree(source, target)
    layout = {"include_dispreferred": True, "rat": rat, "chat_template": False}
    (target / "fspo_config.json").write_text(json.dumps(layout))
    return target


def _without(episodes: list[Episode], **fields: object) -> list[Episode]:
    return [e.model_copy(update=fields) for e in episodes]


def _read_episodes(path: Path) -> list[Episode]:
    return [Episode.model_validate_json(line) for line in path.read_text().splitlines()]


def test_rat_generation_needs_shots_and_a_model_trained_for_it(world, tmp_path: Path):
    generate = ("generate", "--mode", "rat", "--out", tmp_path / "g.jsonl")
    code, out = fspo(*generate, "--model", world["model"], "--episodes", world["episodes"], "--shots", "0")
    refused(code, out, "--mode rat --shots 0: RAT writes the user's description from their shots")
    assert "--mode plain --shots 0" in out
    plain = _trained_as(world["model"], tmp_path / "plain", "none")
    code, out = fspo(*generate, "--model", plain, "--episodes", world["episodes"])
    refused(code, out, f"--mode rat: --model {plain} was trained without RAT")
    no_shots = write_jsonl(tmp_path / "e.jsonl", _without(_read_episodes(world["episodes"]), shots=[]))
    code, out = fspo(*generate, "--model", world["model"], "--episodes", no_shots)
    refused(code, out, f"--mode rat: 8 of 8 episodes in {no_shots} have no shots")
    assert not (tmp_path / "g.jsonl").exists()


def test_accuracy_of_a_rat_model_needs_descriptions(world, tmp_path: Path):
    rat = _trained_as(world["model"], tmp_path / "rat", "target")
    episodes = write_jsonl(
        tmp_path / "e.jsonl", _without(_read_episodes(world["episodes"]), description=None)
    )
    code, out = fspo(
        "eval",
        "accuracy",
        "--model",
        rat,
        "--episodes",
        episodes,
        "--shots",
        "0",
        "--out",
        tmp_path / "a.json",
    )
    refused(code, out, f"{episodes}: 8 of 8 episodes have no user description, but --model {rat} was trained")
    assert not list(tmp_path.glob("a.json*"))


# ------------------------------------------------------------------------------------------ win rates


def test_one_file_as_both_systems_is_refused(world, tmp_path: Path):
    episodes = _read_episodes(world["episodes"])
    a = write_jsonl(tmp_path / "a.jsonl", generations(episodes, "fspo", lambda e: "a red answer"))
    (tmp_path / "link.jsonl").symlink_to(a)
    code, out = fspo(
        "eval", "winrate", "--a", a, "--b", tmp_path / "link.jsonl", "--users", world["root"] / "users.jsonl",
        "--out", tmp_path / "w.json",
    )  # fmt: skip
    refused(code, out, f"--a and --b are the same file ({a})")
    assert not (tmp_path / "w.json").exists()


def test_a_judge_endpoint_no_pair_needed_is_said(world, tmp_path: Path):
    episodes = _read_episodes(world["episodes"])
    a = write_jsonl(tmp_path / "a.jsonl", generations(episodes, "fspo", lambda e: "the same answer"))
    b = write_jsonl(tmp_path / "b.jsonl", generations(episodes, "base", lambda e: "the same answer"))
    code, out = fspo(
        "eval", "winrate", "--a", a, "--b", b, "--users", world["root"] / "users.jsonl", "--judge", "openai",
        "--judge-model", "judge", "--base-url", "http://127.0.0.1:9/v1", "--out", tmp_path / "w.json",
    )  # fmt: skip
    assert code == 0, out
    flat = " ".join(out.split())
    assert "note: the judge endpoint http://127.0.0.1:9/v1 (model judge) was not contacted" in flat
    assert "whether it is reachable was not checked" in flat


def test_a_judge_that_was_asked_has_nothing_to_say(tmp_path: Path):
    from fspo.eval.judges import OpenAIJudge
    from fspo.testing import Reply, serve_openai

    with serve_openai(lambda body: Reply("A", usage=(10, 1))) as server:
        judge = OpenAIJudge(
            model="j", base_url=server.base_url, api_key="k", cache_path=tmp_path / "c.sqlite"
        )
        judge.prefer(toy_users(1)[0], "q?", "one", "two")
        assert judge.notes() == []
        judge.close()


# ------------------------------------------------------------------------------------ moved run folders


def _run_tree(root: Path, model: Path) -> Path:
    """root/sft/model (a copy of `model`) and root/fspo/model, trained from it as its config records."""
    shutil.copytree(model, root / "sft" / "model")
    trained = root / "fspo" / "model"
    shutil.copytree(model, trained)
    config = {"model": str(root / "sft" / "model"), "out": str(root / "fspo"), "beta": 0.5}
    config |= {"include_dispreferred": True, "rat": "none", "chat_template": False}
    (trained / "fspo_config.json").write_text(json.dumps(config))
    return trained


def test_a_copied_folder_of_runs_uses_its_own_starting_model(world, tmp_path: Path):
    from fspo.infer.best_of import training_reference

    original = tmp_path / "original"
    _run_tree(original, world["model"])
    assert training_reference(original / "fspo" / "model") == (str(original / "sft" / "model"), 0.5)
    shutil.copytree(original, tmp_path / "copy")
    assert training_reference(tmp_path / "copy" / "fspo" / "model") == (str(tmp_path / "copy/sft/model"), 0.5)
    # A run moved alone still finds the model it started from where it was.
    shutil.move(tmp_path / "copy" / "fspo", tmp_path / "alone")
    assert training_reference(tmp_path / "alone" / "model") == (str(original / "sft" / "model"), 0.5)
    shutil.rmtree(original)
    with pytest.raises(UserError, match="field 'model'.*pass --ref PATH"):
        training_reference(tmp_path / "alone" / "model")


# -------------------------------------------------------------------------------------------- training


def test_shots_dropped_for_the_token_budget_are_said_at_training_start(world, tmp_path: Path):
    long_answer = " ".join(["red"] * 400)
    episodes = []
    for e in _read_episodes(world["episodes"]):
        first = e.shots[0].model_copy(update={"chosen": long_answer})
        episodes.append(e.model_copy(update={"shots": [first, *e.shots[1:]], "split": "train"}))
    train = write_jsonl(tmp_path / "train.jsonl", episodes)
    code, out = fspo(
        "train", "sft", "--model", world["model"], "--episodes", train, "--out", tmp_path / "run",
        "--max-tokens", "256", "--max-steps", "1", "--batch-size", "1",
    )  # fmt: skip
    assert code == 0, out[-3000:]
    flat = " ".join(out.split())
    assert "max_tokens 256: 8 of 8 training episodes lost 8 shots to fit" in flat, out[-3000:]


# ----------------------------------------------------------------------------------------- serve import


def test_serve_import_suggests_only_the_options_it_has(tmp_path: Path):
    prefs = tmp_path / "p.jsonl"
    prefs.write_text('{"user_id": "u", "question": "q", "chosen": "a"}\n')
    code, out = fspo("serve", "import", prefs, "--db", f"sqlite:///{tmp_path / 's.db'}")
    refused(code, out, "p.jsonl:1: rejected: Field required")
    assert "--skip-invalid" not in out  # `data convert` has it; `serve import` does not
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
