"""Routing policies. The serving spine has one: least-loaded."""

from __future__ import annotations

import random
from collections.abc import Sequence

from wattserve.errors import NoHealthyExpert

from .base import Candidate, Plan, RequestFeatures


def eligible(request: RequestFeatures, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Healthy replicas that may serve ``request`` (only the pinned expert's, if pinned)."""
    pool = [c for c in candidates if request.expert is None or c.expert == request.expert]
    healthy = [c for c in pool if c.healthy]
    if not healthy:
        what = f"expert {request.expert!r}" if request.expert else "any expert"
        raise NoHealthyExpert(
            f"no healthy replica of {what} ({len(pool)} known, all unhealthy or starting); retry shortly"
        )
    return healthy


def load_fraction(c: Candidate) -> float:
    """Occupancy of a replica: what it is running or queueing, relative to its batch size.

    The gateway's own in-flight count is fresher than the replica's last published queue, so the
    larger of the two is used.
    """
    queued = c.profile.queue_depth if c.profile else 0
    batch = c.profile.max_batch if c.profile else 1
    return max(c.inflight, queued) / max(1, batch)


class LeastLoaded:
    """Send each request to the replica with the lowest occupancy; ties broken at random."""

    name = "least_loaded"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = eligible(request, candidates)
        jitter = {c.key: self.rng.random() for c in pool}
        ranked = tuple(sorted(pool, key=lambda c: (load_fraction(c), jitter[c.key])))
        best = ranked[0]
        return Plan(
            ranked=ranked,
            policy=self.name,
            reason=f"least loaded: {best.expert}/{best.replica} at {load_fraction(best):.2f} of its batch",
        )


POLICIES = {"least_loaded": LeastLoaded}


def make_policy(name: str, rng: random.Random | None = None):
    try:
        return POLICIES[name](rng=rng)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
