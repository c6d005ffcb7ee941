"""Shared helpers for the training tests: a toy preference world and tiny model folders.

Toy world: each user has a favourite colour; of two answers, the user prefers the one with that
colour. A model can only rank a new pair correctly from the shots, which is what FSPO learns.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fspo.data.schema import Episode, Preference

COLOURS = ["red", "blue", "green", "yellow"]
THINGS = ["coat", "hat", "car", "wall", "cup", "bike", "door", "lamp"]


def toy_episodes(
    n_users: int = 8, per_user: int = 6, shots: int = 2, seed: int = 0, prefix: str = "u"
) -> list[Episode]:
    rng = random.Random(seed)
    episodes = []
    for u in range(n_users):
        uid = f"{prefix}{u}"
        fav = COLOURS[u % len(COLOURS)]
        prefs = []
        for i in range(shots + 1):
            thing = THINGS[(u + i) % len(THINGS)]
            other = rng.choice([c for c in COLOURS if c != fav])
            prefs.append(
                Preference(
                    user_id=uid,
                    question=f"Which {thing} should I get?",
                    chosen=f"Get the {fav} {thing}.",
                    rejected=f"Get the {other} {thing}.",
                )
            )
        for j in range(per_user):
            rng.shuffle(prefs)
            episodes.append(
                Episode(
                    episode_id=f"{uid}-{j}",
                    user_id=uid,
                    shots=prefs[:shots],
                    query=prefs[shots],
                    description=f"This user loves the colour {fav}.",
                )
            )
    rng.shuffle(episodes)
    return episodes


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r.model_dump(mode="json")) + "\n" for r in records))
    return path


def toy_corpus(episodes: list[Episode]) -> list[str]:
    texts = []
    for e in episodes:
        for p in [*e.shots, e.query]:
            texts.append(f"## Question \n{p.question}\n## Response \n{p.chosen}\n{p.rejected}\n")
    return texts


def tiny_llama(folder: Path, texts: list[str]) -> Path:
    from fspo.models.default import init_model

    return init_model(folder, texts, size="tiny", seed=0)


def tiny_gpt2(folder: Path, llama_folder: Path) -> Path:
    """A GPT-2 architecture sharing the Llama folder's tokenizer: any HF causal LM must train."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(llama_folder)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def toy_preferences(
    n_users: int = 6, per_user: int = 12, prefix: str = "u", seed: int = 0
) -> tuple[list[Preference], list]:
    """(preferences, users) of the toy world with `per_user` distinct questions per user.

    Input for `fspo.data.episodes.build_episodes`, which decides which episodes share their shots.
    """
    from fspo.data.schema import User

    rng = random.Random(seed)
    prefs, users = [], []
    for u in range(n_users):
        uid = f"{prefix}{u}"
        fav = COLOURS[u % len(COLOURS)]
        users.append(User(user_id=uid, description=f"This user loves the colour {fav}."))
        for i in range(per_user):
            thing = THINGS[(u + i) % len(THINGS)]
            other = rng.choice([c for c in COLOURS if c != fav])
            words = " very" * (i % 4)  # answers of different lengths: something for bucketing to sort
            prefs.append(
                Preference(
                    user_id=uid,
                    question=f"Which {thing} should I get for room {i}?",
                    chosen=f"Get the{words} {fav} {thing}.",
                    rejected=f"Get the{words} {other} {thing}.",
                )
            )
    return prefs, users
