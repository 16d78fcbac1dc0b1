"""Routing policies behind one interface: MoE² and the baselines it must beat.

Every policy ranks replicas for a request from plain values and returns a
:class:`~router.base.Plan`. Each lives in its own module here and registers itself once
(:func:`register`); this package imports every module in it, so adding a policy is adding a file.

- ``least_loaded``: the replica with the lowest occupancy.
- ``packed``: the fullest replica with batch room (bin packing at admission: idle replicas can go).
- ``random``: an expert uniformly at random.
- ``round_robin``: experts in turn.
- ``cheapest``: the lowest predicted energy.
- ``strongest``: the highest configured quality prior (the same expert for every prompt).
- ``threshold``: RouteLLM-style two-model router, the strong expert when the gate predicts it
  gains at least ``threshold`` in quality over the weak one (Ong et al. 2024, our reading).
- ``moe2``: gate -> cost model -> the best expert or subset under budgets (docs/routing.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Policy
from .registry import make_policy, policy_names, register

__all__ = ["Policy", "make_policy", "policy_names", "register"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
