"""Toy data and tiny models shared by the test modules.

The toy world (users who prefer answers naming their favourite colour) and the tiny models live in
`fspo.testing`, so benchmarks build the same ones; here they become
fixtures, built once per session or module where building takes a while. Records handed out by
session fixtures are shared: derive changed ones with `model_copy`, never edit them in place.

`postgres` is a throwaway PostgreSQL server for the session (`fspo.testing.postgres_cluster`) and
`postgres_url` a fresh database on it for one test. Without PostgreSQL they skip, saying why, except
where the environment says CI=true: CI installs PostgreSQL (.ci/run), so there a skip would hide a
broken install, and they fail instead.

Plain helpers (`from conftest import write_jsonl`; pytest puts this folder on `sys.path`): `write_jsonl`
and `generations` for the rows a test writes by hand, `numbered_preference` and `shared_shot_episodes`
for users whose episodes share one shot set, `tiny_llama_dir` and `train_world` for model
folders that training runs start from, `cli_args` and `data_cli` for command lines.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fspo.core.errors import UserError
from fspo.data.schema import Episode, Preference, User
from fspo.data.template import render
from fspo.testing import toy_corpus, toy_episodes, toy_users

# The real `fspo` command in a subprocess (what a user runs), offline, one thread, wide enough that a
# one-line error is never wrapped.
FSPO_CLI = [sys.executable, "-c", "from fspo.cli import main; main()"]
CLI_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "400",
}


def write_jsonl(path: Path, rows: list) -> Path:
    """Records or plain dicts, one JSON object a line."""
    path.write_text(
        "".join(json.dumps(r if isinstance(r, dict) else r.model_dump(mode="json")) + "\n" for r in rows)
    )
    return path


def numbered_preference(user: str, i: int) -> Preference:
    """`user`'s preference number `i`: its question and answers carry the number, so no two are alike."""
    return Preference(
        user_id=user, question=f"question {i}?", chosen=f"good answer {i}.", rejected=f"bad {i}"
    )


def shared_shot_episodes(shots: int, queries: int) -> list[Episode]:
    """Users u1 and u2, each with one set of `shots` shots and `queries` episodes asking the next
    questions behind it: the K questions of one shared training row."""
    out = []
    for user in ("u1", "u2"):
        shot_set = [numbered_preference(user, i) for i in range(shots)]
        for q in range(shots, shots + queries):
            query = numbered_preference(user, q)
            out.append(Episode(episode_id=f"{user}-{q}", user_id=user, shots=shot_set, query=query))
    return out


def generations(episodes: list[Episode], system: str, answer: Callable[[Episode], str]) -> list[dict]:
    """Generation rows (as `fspo eval generate` writes them) of `system` answering each episode's query."""
    return [
        {
            "episode_id": e.episode_id,
            "user_id": e.user_id,
            "split": e.split,
            "question": e.query.question,
            "system": system,
            "answer": answer(e),
            "description": None,
        }
        for e in episodes
    ]


def tiny_llama_dir(folder: Path, texts: list[str]) -> Path:
    """The embedded default model at size "tiny" (tokenizer and Llama) initialised on `texts`, in `folder`."""
    from fspo.models.default import init_model

    return init_model(folder, texts, size="tiny", seed=0)


def train_world(root: Path, episodes: list[Episode]) -> dict[str, Path]:
    """A folder to train from: `train` (`episodes` as JSONL), `llama` (`tiny_llama_dir` on the episodes'
    corpus three times over) and `gpt2` (a tiny GPT-2 with the same tokenizer: any causal LM must train).

    The GPT-2 draws its weights from torch's random state as `init_model`, which seeds it, leaves it.
    """
    from transformers import AutoTokenizer

    from fspo.testing import tiny_gpt2

    llama = tiny_llama_dir(root / "llama", toy_corpus(episodes) * 3)
    tokenizer = AutoTokenizer.from_pretrained(llama)
    gpt2 = root / "gpt2"
    tiny_gpt2(tokenizer, seed=None).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    return {"root": root, "train": write_jsonl(root / "train.jsonl", episodes), "llama": llama, "gpt2": gpt2}


def cli_args(*words: object, **options: object) -> list[str]:
    """A command line: `words`, then `--name value` for each option (`_` in a name becomes `-`); an option
    that is True gives `--name`, one that is False `--no-name`."""
    args = [str(w) for w in words]
    for name, value in options.items():
        flag = name.replace("_", "-")
        if value is True:
            args.append(f"--{flag}")
        elif value is False:
            args.append(f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def run_typer(app: object, *args: object) -> tuple[int, str]:
    """Run a typer `app` as `fspo.cli.main` does: a UserError is one message and exit status 2."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [str(a) for a in args])
    if isinstance(result.exception, UserError):
        return 2, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def data_cli(*args: object) -> tuple[int, str]:
    """`fspo data ...` through `run_typer`."""
    from fspo.data.cli import app

    return run_typer(app, *args)


@pytest.fixture(scope="session")
def toy_texts() -> list[str]:
    """The corpus of the default toy episodes (8 users, 6 episodes each), three times over."""
    return toy_corpus(toy_episodes(toy_users())) * 3


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory, toy_texts: list[str]) -> Path:
    """`tiny_llama_dir` initialised on `toy_texts`."""
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama") / "model", toy_texts)


@pytest.fixture(scope="session")
def eval_users() -> list[User]:
    """Four toy users: favourites red, blue, green, yellow."""
    return toy_users(4)


@pytest.fixture(scope="session")
def eval_episodes(eval_users: list[User]) -> list[Episode]:
    """Two episodes a user, three shots each: `test_seen` for the even users, `test_unseen` for the odd."""
    seen = {u.user_id for u in eval_users[::2]}
    return [
        e.model_copy(update={"split": "test_seen" if e.user_id in seen else "test_unseen"})
        for e in toy_episodes(eval_users, per_user=2, shots=3)
    ]


@pytest.fixture(scope="module")
def eval_lm(eval_episodes: list[Episode]):
    """(model, tokenizer): a `tiny_lm` trained on the rendered eval episodes; per module, since tests
    may patch the model."""
    from fspo.testing import tiny_lm

    rendered = [render(e) for e in eval_episodes]
    return tiny_lm([r.prompt + r.chosen for r in rendered] * 3)


@pytest.fixture(scope="session")
def postgres():
    """A `fspo.testing.PostgresCluster` for the whole session (see the module docstring)."""
    from fspo.testing import postgres_cluster, postgres_missing

    if missing := postgres_missing():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but {missing}", pytrace=False)
        pytest.skip(missing)
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres) -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty PostgreSQL database, dropped after the test: no test sees
    another's rows."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)
