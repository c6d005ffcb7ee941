"""Text for the embedded default model: a corpus file, or a simulated domain.

For a simulated domain the corpus is the simulator's plain text plus its preferences rendered in
the FSPO layout (`fspo.models.pretrain.template_documents`), so the pretrained model knows both the
domain's language and the episode format. The users simulated here use their own seed stream
(`seed + 7919`), so pretraining does not see the train/test users' exact preferences.
"""

from __future__ import annotations

from typing import Any

from fspo.core.errors import UserError


def sim_texts(domain: str, seed: int = 0, n_users: int = 200, prefs_per_user: int = 20) -> list[str]:
    """Plain domain text and template-layout documents from the simulator (fspo.sim)."""
    try:
        from fspo import sim
    except ImportError as err:  # pragma: no cover - the simulator ships with fspo
        raise UserError(f"the simulator is not available: {err}") from None
    simulate = getattr(sim, "simulate", None)
    corpus = getattr(sim, "corpus", None)
    if not callable(simulate):  # the package may only expose the submodule
        try:
            from fspo.sim.simulate import simulate
        except ImportError:
            simulate = None
    if not callable(corpus):
        corpus = None
    if simulate is None:
        raise UserError("the simulator (fspo.sim.simulate) is not available in this installation")
    from fspo.models.pretrain import template_documents

    try:
        data: Any = simulate(domain, n_users=n_users, prefs_per_user=prefs_per_user, seed=seed + 7919)
    except (KeyError, ValueError) as err:
        raise UserError(f"unknown or invalid simulated domain {domain!r}: {err}") from None
    texts: list[str] = []
    if corpus is not None:
        texts.extend(_corpus_texts(corpus, domain, seed))
    texts.extend(template_documents(data.preferences, shots=4, seed=seed))
    return texts


def _corpus_texts(corpus: Any, domain: str, seed: int) -> list[str]:
    import inspect

    params = inspect.signature(corpus).parameters
    kwargs: dict[str, Any] = {}
    if "seed" in params:
        kwargs["seed"] = seed
    out = corpus(domain, **kwargs)
    if isinstance(out, str):
        return [d for d in out.split("\n\n") if d.strip()]
    return [str(t) for t in out]
