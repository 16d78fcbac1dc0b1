"""The request path's copies and call ids: what the hot path uses instead of
``dataclasses.replace`` and ``uuid4`` must behave like them."""

from __future__ import annotations

import dataclasses

import pytest

from router.base import Plan
from runtime.gateway.request import Request, new_call_id
from wattserve.types import Priority, SamplingParams, evolve


def test_evolve_copies_like_dataclasses_replace():
    req = Request(prompt="hi", max_tokens=3, tenant="t", sampling=SamplingParams(temperature=0.5))
    changes = {"max_tokens": 7, "tenant": "default", "priority": Priority.HIGH}
    assert evolve(req, **changes) == dataclasses.replace(req, **changes)
    assert req.max_tokens == 3 and req.tenant == "t"  # the original is unchanged
    plan = Plan(ranked=(), policy="p", reason="r")
    assert evolve(plan, predicted_quality={"a": 0.5}).predicted_quality == {"a": 0.5}
    assert evolve(plan) == plan and evolve(plan) is not plan


def test_evolve_copies_dataclasses_with_and_without_slots_and_of_one_field():
    @dataclasses.dataclass(frozen=True)
    class Plain:  # no slots: written through object.__setattr__
        a: int
        b: str = "x"

    @dataclasses.dataclass(slots=True, frozen=True)
    class One:
        only: tuple

    assert evolve(Plain(1), b="y") == Plain(1, "y") and evolve(Plain(1)) == Plain(1)
    assert evolve(One((1,)), only=(2,)) == One((2,)) and evolve(One((1,))) == One((1,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(One((1,))).only = (3,)  # the copy is as frozen as the original


def test_evolve_refuses_unknown_fields_and_unsupported_classes():
    with pytest.raises(TypeError, match="no field bogus"):
        evolve(Request(), bogus=1)

    @dataclasses.dataclass(frozen=True)
    class Checked:
        x: int

        def __post_init__(self):
            if self.x < 0:
                raise ValueError("x < 0")

    with pytest.raises(TypeError, match="__post_init__"):
        evolve(Checked(1), x=-1)  # would skip the check: refused


def test_call_ids_are_distinct_hex_of_uuid_length():
    ids = [new_call_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
