"""Policy name -> class. A policy module registers its class once with :func:`register`; the
config's allowed ``gateway.routing_policy`` values and :func:`make_policy` both read this table.
"""

from __future__ import annotations

import random

from ..base import RouterSettings
from ..cost import CostModel
from .base import Policy

_POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` selectable by its ``name``."""
    known = _POLICIES.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"routing policy {cls.name!r} registered twice ({known.__qualname__}, {cls.__qualname__})")
    _POLICIES[cls.name] = cls
    return cls


def policy_names() -> tuple[str, ...]:
    """Every registered policy name, sorted."""
    return tuple(sorted(_POLICIES))


def make_policy(name: str, *, rng: random.Random | None = None, cost: CostModel | None = None,
                settings: RouterSettings | None = None) -> Policy:
    """A new ``name`` policy deciding with ``cost`` (shared with whoever teaches it) and ``settings``.

    Raises ValueError naming the known policies when ``name`` is not one of them.
    """
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(policy_names())}") from None
    return cls(rng=rng, cost=cost, settings=settings)
