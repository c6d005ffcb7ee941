"""The simulated domains by name. The domain modules import `base`; only this module imports them."""

from __future__ import annotations

from typing import Any

from fspo.core.errors import UserError
from fspo.sim.base import Domain
from fspo.sim.elix import Elix
from fspo.sim.reviews import Reviews
from fspo.sim.roleplay import Roleplay

DOMAINS: dict[str, type[Domain]] = {cls.name: cls for cls in (Elix, Reviews, Roleplay)}


def domain_names() -> list[str]:
    return sorted(DOMAINS)


def get_domain(name: str, **options: Any) -> Domain:
    if name not in DOMAINS:
        raise UserError(f"unknown sim domain {name!r}; choose one of: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name](**options)
