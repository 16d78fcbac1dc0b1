"""The gateway's memory of who served which request: bounded by count and by age."""

from __future__ import annotations

from runtime.served import ServedRequest, ServedRequests


def test_bounded_by_count_and_ttl():
    now = [0.0]
    m = ServedRequests(capacity=3, ttl_s=10.0, clock=lambda: now[0])
    for i in range(5):
        m.add(f"r{i}", ServedRequest("t", "edge", 0.3))
    assert len(m) == 3 and m.get("r0") is None and m.get("r4").expert == "edge"
    now[0] = 10.0
    assert m.get("r2") is not None  # exactly the TTL: still there
    now[0] = 10.5
    assert m.get("r2") is None and len(m) == 0


def test_a_reused_id_refers_to_its_latest_request():
    m = ServedRequests(capacity=2, ttl_s=10.0, clock=lambda: 0.0)
    m.add("r", ServedRequest("t", "edge", 0.3))
    m.add("s", ServedRequest("t", "edge", 0.3))
    m.add("r", ServedRequest("t", "cloud", 0.5))
    m.add("u", ServedRequest("t", "edge", 0.3))
    assert m.get("r").expert == "cloud" and m.get("s") is None
