"""The simulated domains by name. The domain modules import `base`; only this module imports them.

A domain of your own is a `Domain` subclass made known with `register_domain` (before the first
`simulate`, `fspo quickstart` or judge that names it); everything downstream (episodes, the pretraining
corpus, the exact-reward judge, the quickstart and `fspo paper`) finds it here by its `name`.
"""

from __future__ import annotations

from typing import Any

from fspo.core.errors import UserError
from fspo.sim.base import Domain
from fspo.sim.elix import Elix
from fspo.sim.reviews import Reviews
from fspo.sim.roleplay import Roleplay

DOMAINS: dict[str, type[Domain]] = {cls.name: cls for cls in (Elix, Reviews, Roleplay)}


def register_domain(cls: type[Domain]) -> type[Domain]:
    """Make `cls` a domain by its `name` (usable as a class decorator). A name already taken by
    another class is refused: two simulators must never judge under one name."""
    taken = DOMAINS.get(cls.name)
    if taken is not None and taken is not cls:
        raise UserError(f"sim domain name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    DOMAINS[cls.name] = cls
    return cls


def domain_names() -> list[str]:
    return sorted(DOMAINS)


def domain_class(name: str) -> type[Domain]:
    if name not in DOMAINS:
        raise UserError(f"unknown sim domain {name!r}; choose one of: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name]


def get_domain(name: str, **options: Any) -> Domain:
    if name not in DOMAINS:
        raise UserError(f"unknown sim domain {name!r}; choose one of: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name](**options)
