"""Best-of-N's reference for a served model: found when the server starts, loaded on first use.

``best_of`` ranks a request's samples by the implicit reward against the reference of the model's own
training (`fspo.infer.best_of.training_reference`: the model its folder's ``fspo_config.json`` says
training started from, with that training's β), or, for a model without a training record, against
itself without the shots, as ``fspo generate --best-of`` does. The folder is found (and its tokenizer
checked) when the answerer is made, so a missing reference is an error at startup, never at a
request; its weights are loaded by the first ``best_of`` request, so a server nobody asks for
best_of holds no second model. Systems trained from one starting model get one `ServedReference`
(`fspo serve` shares them), hence one copy of its weights.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # best_of imports torch, which a module only naming it need not load
    from fspo.infer.best_of import Reference


def model_id_of(model_dir: str | Path) -> str:
    """The folder's name, or its run's when the folder is a run's ``model`` output (a training run
    saves its model as ``<run>/model``: ``runs/quickstart/fspo/model`` is "fspo"), so that the
    models of one quickstart are told apart in ``GET /v1/models`` and in a response's ``fspo``."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


class ServedReference:
    """The reference of one or more served models: `folder` (None: each model is its own, without
    shots) and β, with the folder's weights loaded once, by the first caller of `reference`."""

    def __init__(self, folder: str | None = None, beta: float = 1.0):
        from fspo.infer.best_of import SELF

        self.folder = folder
        self.beta = beta
        # What a response names (never a path of the server's): the run the reference comes from.
        self.name = SELF if folder is None else model_id_of(folder)
        self._model: Any = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, model_dir: str | Path, known: dict[Any, ServedReference] | None = None) -> ServedReference:
        """The training reference of the model in `model_dir` (a `UserError` naming its config file
        when that is not a folder here). `known` holds the references made before, by folder and β:
        one found again is that one, so its weights are loaded once."""
        from fspo.infer.best_of import training_reference

        found = training_reference(model_dir)
        if known is None:
            return cls(*found)
        return known.setdefault(found, cls(*found))

    def reference(self, device: Any) -> Reference:
        """What `fspo.infer.best_of.best_of_n` subtracts, its weights on `device` (loaded on first use)."""
        from fspo.infer.best_of import Reference

        if self.folder is None:
            return Reference(None, self.name)
        with self._lock:
            if self._model is None:
                from fspo.models.loading import load_model

                self._model = load_model(self.folder).to(device).eval()
        return Reference(self._model, self.name, self.beta)
