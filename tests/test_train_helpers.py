"""Shared helpers for the training tests, over the toy world of `fspo.data.toy` and the tiny models of
`fspo.models.tiny`: each user prefers the answer naming their favourite colour, which a model can only
tell from the shots, which is what FSPO learns.
"""

from __future__ import annotations

from pathlib import Path

import conftest
from fspo.data import toy
from fspo.data.schema import Episode, Preference


def toy_episodes(
    n_users: int = 8, per_user: int = 6, shots: int = 2, seed: int = 0, prefix: str = "u"
) -> list[Episode]:
    return toy.toy_episodes(toy.toy_users(n_users, prefix), per_user=per_user, shots=shots, seed=seed)


def write_jsonl(path: Path, records: list) -> Path:
    return conftest.write_jsonl(path, records)


def toy_corpus(episodes: list[Episode]) -> list[str]:
    return toy.toy_corpus(episodes)


def tiny_llama(folder: Path, texts: list[str]) -> Path:
    from fspo.models.default import init_model

    return init_model(folder, texts, size="tiny", seed=0)


def tiny_gpt2(folder: Path, llama_folder: Path) -> Path:
    """A GPT-2 architecture sharing the Llama folder's tokenizer: any HF causal LM must train.

    Its weights come from torch's random state as the caller left it (`init_model` seeds it).
    """
    from transformers import AutoTokenizer

    from fspo.models.tiny import tiny_gpt2 as build

    tok = AutoTokenizer.from_pretrained(llama_folder)
    build(tok, seed=None).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def toy_preferences(
    n_users: int = 6, per_user: int = 12, prefix: str = "u", seed: int = 0
) -> tuple[list[Preference], list]:
    """(preferences, users) of the toy world with `per_user` distinct questions per user.

    Input for `fspo.data.episodes.build_episodes`, which decides which episodes share their shots.
    """
    users = toy.toy_users(n_users, prefix)
    return toy.toy_preferences(users, per_user=per_user, seed=seed), users
