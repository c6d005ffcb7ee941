"""Shared helpers for the evaluation tests: toy users, episodes, generations and a tiny model.

Toy world: a user's reward counts the occurrences of their favourite word, so an exact judge is
trivial to predict. No test lives here; other test modules import these helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

from fspo.data.schema import Episode, Preference, User

WORDS = ["red", "blue", "green", "gold"]


def toy_users(n: int = 4) -> list[User]:
    return [
        User(user_id=f"u{i}", description=f"Loves the word {WORDS[i % 4]}.", metadata={"fav": WORDS[i % 4]})
        for i in range(n)
    ]


def fav_reward_for(user: User):
    """A fake `reward_for`: +1 per occurrence of the user's favourite word."""
    fav = user.metadata["fav"]
    return lambda question, text: float(text.split().count(fav))


def toy_episodes(users: list[User], per_user: int = 2, shots: int = 3) -> list[Episode]:
    episodes = []
    for i, u in enumerate(users):
        fav = u.metadata["fav"]
        other = WORDS[(i + 1) % 4]
        prefs = [
            Preference(
                user_id=u.user_id,
                question=f"Pick a colour for thing {j}?",
                chosen=f"Take {fav} for {j}.",
                rejected=f"Take {other} for {j}.",
            )
            for j in range(shots + per_user)
        ]
        for k in range(per_user):
            episodes.append(
                Episode(
                    episode_id=f"{u.user_id}-e{k}",
                    user_id=u.user_id,
                    shots=prefs[:shots],
                    query=prefs[shots + k],
                    description=u.description,
                    split="test_seen" if i % 2 == 0 else "test_unseen",
                )
            )
    return episodes


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join(json.dumps(r if isinstance(r, dict) else r.model_dump(mode="json")) + "\n" for r in rows)
    )
    return path


def generations(episodes: list[Episode], system: str, answer) -> list[dict]:
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


def tiny_model(corpus: list[str], seed: int = 0):
    """A random 2-layer LlamaForCausalLM and a byte-level BPE tokenizer built with `tokenizers`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fspo.models.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval(), tok
