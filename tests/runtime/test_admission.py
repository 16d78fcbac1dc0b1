"""Admission as plain values: caps, fair share across tenants, retry hints, frame rate."""

from __future__ import annotations

import pytest

from runtime.admission import MIN_RETRY_MS, Admission, RateLimit
from tests.fakes import FakeClock
from wattserve.errors import QueueFull


def test_server_and_tenant_caps_refuse_with_a_hint():
    clock = FakeClock()
    adm = Admission(4, tenant_max_inflight=2, fair_share_above=1.0, tenant_caps={"vip": 4}, clock=clock)
    a = [adm.acquire("a"), adm.acquire("a")]
    with pytest.raises(QueueFull, match="tenant 'a' has 2 requests in flight") as err:
        adm.acquire("a")
    assert err.value.details["retry_after_ms"] >= MIN_RETRY_MS and err.value.details["reason"] == "tenant"
    v = [adm.acquire("vip"), adm.acquire("vip")]
    with pytest.raises(QueueFull, match="limit of 4 requests in flight"):
        adm.acquire("vip")
    for t in a + v:
        adm.release(t)
        adm.release(t)  # idempotent
    assert adm.inflight == 0 and adm.by_tenant == {} and adm.refused == {"server": 1, "tenant": 1, "fair_share": 0}


def test_a_flooding_tenant_cannot_starve_others():
    adm = Admission(8, fair_share_above=0.5)
    flood = []
    for _ in range(8):
        try:
            flood.append(adm.acquire("flood"))
        except QueueFull:
            break
    assert len(flood) == 8  # alone, a tenant may use the whole server
    for t in flood[:4]:  # half of it frees up
        adm.release(t)
    # saturated (4 of 8 >= 50%): the newcomer is under its share, the flooder is over it
    other = [adm.acquire("other") for _ in range(3)]
    with pytest.raises(QueueFull, match="fair share"):
        adm.acquire("flood")
    other.append(adm.acquire("other"))  # the last free slot goes to the tenant under its share
    assert adm.fair_share("other") == 4 and len(other) == 4 and adm.inflight == 8


def test_a_tenant_between_two_requests_keeps_its_share_for_a_while():
    clock = FakeClock()
    adm = Admission(8, fair_share_above=0.5, clock=clock)
    adm.release(adm.acquire("calm"))  # one request, done: calm holds nothing now
    clock.advance(0.5)  # ... and is about to send the next one
    flood = []
    with pytest.raises(QueueFull, match="fair share"):
        while True:
            flood.append(adm.acquire("flood"))
    assert len(flood) == 4  # half the server, not all of it: calm finds room
    adm.release(adm.acquire("calm"))
    clock.advance(10.0)  # calm went quiet (well past 4 mean durations): the flooder may take the rest
    assert adm.fair_share("flood") == 8 and "calm" not in adm.last_seen_s


def test_weights_set_the_shares():
    adm = Admission(12, fair_share_above=0.1, weights={"gold": 2.0})
    adm.acquire("gold")
    adm.acquire("bronze")
    assert adm.fair_share("gold") == 8 and adm.fair_share("bronze") == 4


def test_retry_hint_follows_request_duration():
    clock = FakeClock()
    adm = Admission(2, clock=clock)
    for _ in range(50):
        t = adm.acquire("a")
        clock.advance(2.0)
        adm.release(t)
    assert 1900 < adm.duration_ms < 2100
    held = [adm.acquire("a"), adm.acquire("a")]
    with pytest.raises(QueueFull) as err:
        adm.acquire("b")
    assert 900 <= err.value.details["retry_after_ms"] <= 1100  # ~2 s / 2 holders
    assert held


def test_rate_limit_allows_bursts_then_the_rate():
    clock = FakeClock()
    limit = RateLimit(10.0, 3, clock)
    assert [limit.take() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.125)  # 1.25 tokens (0.1 s after t=100 is 0.9999... of one in floats)
    assert limit.take() and not limit.take()
    clock.advance(10.0)
    assert sum(limit.take() for _ in range(10)) == 3  # the bucket holds at most the burst
