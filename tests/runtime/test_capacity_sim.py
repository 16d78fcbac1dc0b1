"""The capacity simulator: the day's load shape, FIFO latencies from the fluid, determinism,
energy bookkeeping, policies, and the `wattserve simulate capacity` CLI on a short slice."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from runtime.capacity.planner import SLO, Plan, PlannerConfig, PoolSpec
from runtime.capacity.profile import replica_profile_from_device
from runtime.capacity.report import CapacityExperiment, run_experiment, saving_sources
from runtime.capacity.sim import SimConfig, WarmTier, _Class, _Pool, request_latencies, simulate_day
from runtime.capacity.workload import DayShape, day_workload
from runtime.cli import main as cli_main
from runtime.power.workload import Trace, Workload, load_trace

TRACES = Path("/work/shared/data/traces/azure_llm_2023")
CONV = TRACES / "AzureLLMInferenceTrace_conv.csv"
needs_traces = pytest.mark.skipif(not CONV.exists(), reason="Azure traces not present")


@pytest.fixture(scope="module")
def profile():
    return replica_profile_from_device("a100", gpus=8, model_params=70e9, max_batch=64)


def synthetic(rate: float, seconds: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    arr = np.sort(rng.uniform(0, seconds, n))
    return Workload("synthetic", arr, rng.integers(200, 3000, n), rng.integers(10, 400, n),
                    high_priority=rng.random(n) < 0.5)


def specs(max_replicas: int = 4, min_replicas: int = 0):
    return tuple(PoolSpec(name=p, priority=p, slo=slo, min_replicas=min_replicas, max_replicas=max_replicas,
                          cold_start_s=30.0, cold_start_energy_j=3e4)
                 for p, slo in (("high", SLO(ttft_ms=2000, tpot_ms=100)), ("low", SLO(ttft_ms=10000, tpot_ms=200))))


def test_day_shape_peaks_and_troughs():
    shape = DayShape(trough_fraction=0.3, peak_hour=14.0)
    assert shape.multiplier(14.0) == pytest.approx(1.0)
    assert shape.multiplier(2.0) == pytest.approx(0.3)
    assert all(0.3 <= shape.multiplier(h) <= 1.0 for h in np.linspace(0, 24, 97))
    with pytest.raises(ValueError):
        DayShape(trough_fraction=0.0)


def test_day_workload_follows_the_curve():
    rng = np.random.default_rng(1)
    t = Trace("t", np.sort(rng.uniform(0, 3500, 7000)), np.full(7000, 100), np.full(7000, 20))
    w = day_workload(t, 4.0, hp_fraction=0.5, seed=0, hours=24, shape=DayShape(0.25, 14.0))
    per_hour = np.bincount((w.arrival_s // 3600).astype(int), minlength=24) / 3600.0
    assert per_hour[14] == pytest.approx(4.0 * DayShape(0.25, 14.0).multiplier(14.5), rel=0.1)
    assert per_hour[2] == pytest.approx(4.0 * DayShape(0.25, 14.0).multiplier(2.5), rel=0.1)
    assert np.all(np.diff(w.arrival_s) >= 0) and w.arrival_s[-1] < 24 * 3600


def test_fifo_latency_of_a_lone_request(profile):
    # one 1000-token prompt at t = 0.2 s, alone: TTFT is its own prefill, TPOT the batch-1 step
    dt, ci = 1.0, profile.max_clock_index
    own = profile.prefill_s(1000, ci)
    c_tok = np.array([1000.0, 1000.0, 1000.0])
    t_p = np.array([own, 0.0, 0.0])
    step = profile.decode_step(1.0, ci)
    tpot = np.full(3, step)
    ttft, tp = request_latencies(np.array([0.2]), np.array([1000.0]), np.array([10.0]), c_tok, t_p, tpot,
                                 np.full(3, profile.clocks_mhz[ci]), profile, dt)
    assert ttft[0] == pytest.approx(own)
    assert tp[0] == pytest.approx(step)


def test_queued_requests_wait_in_fifo_order(profile):
    # two prompts of 1000 tokens; the pool only prefilled 1500 tokens in tick 0 and the rest in tick 1
    ci = profile.max_clock_index
    ttft, _ = request_latencies(np.array([0.0, 0.0]), np.array([1000.0, 1000.0]), np.array([5.0, 5.0]),
                                np.array([1500.0, 2000.0, 2000.0]), np.array([1.0, 0.5, 0.0]), np.full(3, 0.03),
                                np.full(3, profile.clocks_mhz[ci]), profile, 1.0)
    assert ttft[0] == pytest.approx(1000 / 1500)
    assert ttft[1] == pytest.approx(1.0 + 0.5)


def test_simulation_is_deterministic_and_seeded(profile):
    cfg = SimConfig(policy="both")
    a = simulate_day(synthetic(3.0, 900, seed=3), specs(), profile, cfg)
    b = simulate_day(synthetic(3.0, 900, seed=3), specs(), profile, cfg)
    c = simulate_day(synthetic(3.0, 900, seed=4), specs(), profile, cfg)
    for pa, pb in zip(a.pools, b.pools, strict=True):
        np.testing.assert_array_equal(pa.ttft_s, pb.ttft_s)
        np.testing.assert_array_equal(pa.power_w, pb.power_w)
    assert a.energy_j == b.energy_j != c.energy_j


def test_energy_parts_add_up_to_the_power_series(profile):
    for policy in ("static", "both"):
        r = simulate_day(synthetic(2.0, 600, seed=5), specs(), profile,
                         SimConfig(policy=policy, released_replica_power_w=50.0))
        assert r.energy_j == pytest.approx(float(r.power_w.sum() * r.tick_s), rel=1e-9)
        assert r.energy_source == "modeled:a100"


def test_static_keeps_everything_up_and_finishes_every_request(profile):
    r = simulate_day(synthetic(2.0, 600, seed=6), specs(max_replicas=3), profile, SimConfig(policy="static"))
    for p in r.pools:
        assert np.all(p.replicas == 3) and np.all(p.clock_mhz == profile.clocks_mhz[-1])
        assert p.replica_changes == p.clock_changes == p.cold_starts == 0
        assert not np.isnan(p.ttft_s).any()


def test_autoscale_saves_at_low_load_and_dvfs_lowers_clocks(profile):
    work = synthetic(0.5, 1200, seed=7)
    static = simulate_day(work, specs(max_replicas=6), profile, SimConfig(policy="static"))
    auto = simulate_day(work, specs(max_replicas=6), profile, SimConfig(policy="autoscale"))
    eager = PlannerConfig(clock_change_min_saving=0.0)  # the default keeps max clock for < 3% savings
    dvfs = simulate_day(work, specs(max_replicas=6), profile, SimConfig(policy="dvfs", planner=eager))
    assert auto.energy_j < static.energy_j and dvfs.energy_j < static.energy_j
    assert max(p.replicas[-100:].max() for p in auto.pools) < 6
    assert min(p.clock_mhz[-100:].min() for p in dvfs.pools) < profile.clocks_mhz[-1]


def test_idle_pool_scales_to_zero_and_wakes_with_a_cold_start(profile):
    # requests for 200 s, silence for 700 s, then one more burst
    rng = np.random.default_rng(8)
    arr = np.sort(np.concatenate([rng.uniform(0, 200, 200), rng.uniform(900, 960, 60)]))
    n = len(arr)
    work = Workload("gap", arr, np.full(n, 500), np.full(n, 50), high_priority=np.ones(n, dtype=bool))
    hp, lp = specs(max_replicas=2, min_replicas=0)
    r = simulate_day(replace(work), (hp, lp), profile, SimConfig(policy="autoscale"))
    reps = r.pools[0].replicas
    assert reps[850] == 0  # released after 300 s of nothing
    assert reps[int(arr[-1])] >= 1 and r.pools[0].cold_starts >= 1
    woke = r.pools[0].ttft_s[arr >= 900]
    assert np.nanmax(woke) >= hp.cold_start_s - 15  # the first requests waited for the start


def test_polca_policy_drives_clocks_under_a_tight_budget(profile):
    work = synthetic(6.0, 600, seed=9)
    r = simulate_day(work, specs(max_replicas=4), profile,
                     SimConfig(policy="both+polca", provisioned_power_w=6000.0))
    assert r.polca_capped_s > 0
    with pytest.raises(ValueError):
        SimConfig(policy="both+polca")
    with pytest.raises(ValueError):
        SimConfig(policy="bogus")


@needs_traces
def test_experiment_on_a_trace_slice_reports_every_policy():
    exp = CapacityExperiment(trace=str(CONV), hours=0.1, start_hour=13.0, peak_rate_rps=4.0)
    rows, results = run_experiment(exp)
    assert [r.policy for r in rows] == ["static", "autoscale", "dvfs", "both", "both+polca"]
    static = rows[0]
    assert static.saving == 0.0 and static.energy_kwh > 0
    for r in rows:
        assert set(r.slo_attainment) == {"high", "low", "all"}
        assert r.unfinished == 0
    # the breakdown by energy part adds up to the saving
    text = saving_sources(rows)
    kwh = [float(x.split(" kWh")[0].rsplit(" ", 1)[-1]) for x in text.split(": ", 2)[2].split(", ")]
    assert sum(kwh) == pytest.approx(rows[0].energy_kwh - rows[3].energy_kwh, abs=2.0)
    assert len(load_trace(CONV).arrival_s) > 0


@needs_traces
def test_cli_simulate_capacity_on_a_short_slice(tmp_path):
    out, js, png = io.StringIO(), tmp_path / "cap.json", tmp_path / "cap.png"
    with contextlib.redirect_stdout(out):
        rc = cli_main(["simulate", "capacity", "--trace", str(CONV), "--hours", "0.05", "--start-hour", "13",
                       "--policy", "both", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    text = out.getvalue()
    assert "static" in text and "both" in text and "modeled:a100" in text
    rows = json.loads(js.read_text())
    assert [r["policy"] for r in rows] == ["static", "both"]
    assert png.stat().st_size > 1000


def test_cli_rejects_an_unknown_policy(capsys):
    assert cli_main(["simulate", "capacity", "--trace", str(CONV), "--policy", "magic"]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_fast_clock_loop_only_moves_clocks(profile):
    work = synthetic(3.0, 600, seed=10)
    slow = simulate_day(work, specs(), profile, SimConfig(policy="both"))
    fast = simulate_day(work, specs(), profile, SimConfig(policy="both", clock_interval_s=2.0))
    assert sum(p.replica_changes for p in fast.pools) == sum(p.replica_changes for p in slow.pools)
    assert sum(p.clock_changes for p in fast.pools) >= sum(p.clock_changes for p in slow.pools)


def burst_after_gap(hp: bool = True) -> Workload:
    rng = np.random.default_rng(11)
    arr = np.sort(np.concatenate([rng.uniform(0, 100, 100), rng.uniform(900, 960, 120)]))
    n = len(arr)
    return Workload("gap", arr, np.full(n, 800), np.full(n, 40), high_priority=np.full(n, hp))


def test_oracle_starts_replicas_before_a_burst_it_sees_coming(profile):
    work = burst_after_gap()
    plain = simulate_day(work, specs(max_replicas=3), profile, SimConfig(policy="both"))
    oracle = simulate_day(work, specs(max_replicas=3), profile, SimConfig(policy="oracle"))
    late = work.arrival_s >= 900
    # the serving planner released the idle pool and made the burst wait a cold start; the oracle woke it in time
    assert np.nanmax(plain.pools[0].ttft_s[late]) >= 20.0
    assert np.nanmax(oracle.pools[0].ttft_s[late]) < 5.0
    assert oracle.pools[0].replicas[500] == 0  # released at once in the gap (nothing coming for minutes)
    assert oracle.pools[0].replicas[899] >= 1  # and up before the burst
    assert oracle.energy_j < plain.energy_j


def test_oracle_window_plans_for_finer_bursts(profile):
    work = synthetic(4.0, 900, seed=12)
    coarse = simulate_day(work, specs(max_replicas=4), profile, SimConfig(policy="oracle", oracle_window_s=60.0))
    fine = simulate_day(work, specs(max_replicas=4), profile, SimConfig(policy="oracle", oracle_window_s=5.0))
    assert fine.pools[0].replicas.mean() >= coarse.pools[0].replicas.mean()


def test_warm_tier_wakes_faster_and_draws_its_power(profile):
    work = burst_after_gap()
    cold = simulate_day(work, specs(max_replicas=2), profile, SimConfig(policy="autoscale"))
    warm = simulate_day(work, specs(max_replicas=2), profile,
                        SimConfig(policy="autoscale", warm=WarmTier(wake_s=5.0, power_w=80.0)))
    late = work.arrival_s >= 900
    assert warm.pools[0].warm_starts >= 1 and cold.pools[0].warm_starts == 0
    assert np.nanmax(warm.pools[0].ttft_s[late]) < np.nanmax(cold.pools[0].ttft_s[late]) - 20.0
    assert warm.pools[0].energy_j["warm"] > 0 and cold.pools[0].energy_j["warm"] == 0
    assert warm.pools[0].energy_j["cold_start"] < cold.pools[0].energy_j["cold_start"]
    # a released replica that stayed warm 1 s at most goes cold: no warm start, no warm power to speak of
    brief = simulate_day(work, specs(max_replicas=2), profile,
                         SimConfig(policy="autoscale", warm=WarmTier(wake_s=5.0, power_w=80.0, keep_s=1.0)))
    assert brief.pools[0].warm_starts == 0
    for r in (warm, brief):
        assert r.energy_j == pytest.approx(float(r.power_w.sum() * r.tick_s), rel=1e-9)
    with pytest.raises(ValueError):
        WarmTier(wake_s=-1.0)


def test_packing_decode_saves_energy_at_low_load_and_keeps_every_request(profile):
    work = synthetic(0.5, 900, seed=13)
    spread = simulate_day(work, specs(max_replicas=4), profile, SimConfig(policy="static"))
    packed = simulate_day(work, specs(max_replicas=4), profile, SimConfig(policy="static", pack_decode=True))
    assert packed.energy_j < spread.energy_j
    for a, b in zip(spread.pools, packed.pools, strict=True):
        assert not np.isnan(b.ttft_s).any()
        # the same replicas stay up (the runs end when the last sequence does: compare per tick)
        assert a.energy_j["idle"] / len(a.power_w) == pytest.approx(b.energy_j["idle"] / len(b.power_w))
        assert np.nanmedian(b.tpot_s) >= np.nanmedian(a.tpot_s)  # fuller batches step a little slower
    assert packed.energy_j == pytest.approx(float(packed.power_w.sum() * packed.tick_s), rel=1e-9)


def _one_pool(profile, work: Workload, replicas: int, **cfg):
    spec = specs(max_replicas=replicas)[0]
    cls = _Class(spec, work, np.ones(len(work.arrival_s), dtype=bool), 10, 1.0)
    return _Pool(spec, profile, [cls], 10, 1.0, SimConfig(policy="static", pack_decode=True, **cfg)), cls


def _decoders(pool, n: float) -> None:
    """``n`` sequences out of prefill this tick, no prefill time."""
    pool._decode_packed(pool.ready, 0.0, [[n, 0.0, 0.0, n]], 1.0)


def test_packing_admits_to_the_fullest_replica_with_room_and_never_moves_a_sequence(profile):
    # 200 decoding requests of 5000 tokens each: none finishes within the ticks below
    n = 200
    work = Workload("long", np.zeros(n), np.full(n, 100), np.full(n, 5001), high_priority=np.ones(n, dtype=bool))
    pool, cls = _one_pool(profile, work, 4)
    fill = int(PlannerConfig().max_batch_fill * profile.max_batch)  # 57 of 64
    _decoders(pool, 10)
    assert np.bincount(pool.s_rep, minlength=4).tolist() == [10, 0, 0, 0]  # all on one replica
    _decoders(pool, fill - 10 + 5)
    assert np.bincount(pool.s_rep, minlength=4).tolist() == [fill, 5, 0, 0]  # full: the next one fills up
    assert pool.lanes[0].dec_n == fill + 5 and cls.dec_taken == fill + 5
    # replica 1's sequences are the oldest now: 3 of them end; replica 0 keeps its own, nothing moves
    before = pool.s_rep.copy()
    ones = np.flatnonzero(pool.s_rep == 1)[:3]
    pool.s_rem[ones] = 1e-3
    _decoders(pool, 0)
    assert np.bincount(pool.s_rep, minlength=4).tolist() == [fill, 2, 0, 0]
    assert (pool.s_rep == np.delete(before, ones)).all()
    # a new sequence goes to the fullest replica with room (1, not the empty 2 and 3); fractions wait
    _decoders(pool, 1.5)
    assert np.bincount(pool.s_rep, minlength=4).tolist() == [fill, 3, 0, 0]
    _decoders(pool, 0.5)
    assert np.bincount(pool.s_rep, minlength=4).tolist() == [fill, 4, 0, 0]
    # the idealised bound re-packs: the same sequences on the fewest replicas
    moving, _ = _one_pool(profile, work, 4, pack_migrate=True)
    moving.s_rep, moving.s_rem, moving.s_cls = np.array([0, 1, 2, 3] * 5), np.full(20, 4000.0), np.zeros(20, dtype=int)
    _decoders(moving, 0)
    assert np.bincount(moving.s_rep, minlength=4).tolist() == [20, 0, 0, 0]


def test_a_released_replica_holding_sequences_drains_then_serves_again_first(profile):
    n = 100
    work = Workload("long", np.zeros(n), np.full(n, 100), np.full(n, 5001), high_priority=np.ones(n, dtype=bool))
    pool, _ = _one_pool(profile, work, 3)
    fill = int(PlannerConfig().max_batch_fill * profile.max_batch)
    _decoders(pool, fill + 4)  # replica 0 full, replica 1 holds 4, replica 2 empty
    keep_one = Plan(1, float(profile.clocks_mhz[-1]), 0.0, 0.0, 0.0, True, "test")
    pool.apply(keep_one, 10.0)
    # the emptiest go: replica 2 is released, replica 1 drains with its 4 sequences, still drawing power
    assert pool.ready == 1 and pool.rids == [0] and pool.dids == [1]
    assert np.bincount(pool.s_rep, minlength=3).tolist() == [fill, 4, 0]
    watts = pool._decode_packed(pool.ready, 0.0, [[0.0] * 4], 1.0)
    assert watts > 2 * profile.idle_power_w  # two replicas up, both decoding
    pool.apply(replace(keep_one, replicas=2), 11.0)  # the plan grows: the draining replica serves again
    assert pool.ready == 2 and pool.dids == [] and not pool.starting and pool.cold_starts == 0
    pool.apply(keep_one, 12.0)
    ones = pool.s_rep == 1
    pool.s_rem[ones] = 1e-3  # its sequences end: released
    pool._decode_packed(pool.ready, 0.0, [[0.0] * 4], 1.0)
    assert pool.dids == [] and pool.ready == 1 and 1 in pool.free_ids


def test_migration_free_packing_costs_at_least_the_idealised_bound(profile):
    # 8 req/s needs several replicas per class: sequences left on a replica keep it decoding
    work = synthetic(8.0, 900, seed=13)
    fixed = simulate_day(work, specs(max_replicas=4), profile, SimConfig(policy="both", pack_decode=True))
    moving = simulate_day(work, specs(max_replicas=4), profile,
                          SimConfig(policy="both", pack_decode=True, pack_migrate=True))
    assert fixed.energy_j > moving.energy_j
    for p in fixed.pools:
        assert not np.isnan(p.ttft_s).any()
    assert fixed.energy_j == pytest.approx(float(fixed.power_w.sum() * fixed.tick_s), rel=1e-9)


def test_classes_share_replicas_at_low_load_high_first(profile):
    work = synthetic(0.6, 1800, seed=14)
    cfg = SimConfig(policy="both", share_classes=True)
    apart = simulate_day(work, specs(max_replicas=3), profile, SimConfig(policy="both"))
    shared = simulate_day(work, specs(max_replicas=3), profile, cfg)
    assert shared.share_changes >= 1 and shared.shared_s > 600
    assert apart.share_changes == 0 and apart.shared_s == 0
    hp, lp = shared.pools
    assert lp.replicas[-300:].max() == 0 and hp.replicas[-300:].min() >= 1  # the low pool released
    for p in shared.pools:
        assert not np.isnan(p.ttft_s).any()
    assert shared.energy_j < apart.energy_j
    assert shared.energy_j == pytest.approx(float(shared.power_w.sum() * shared.tick_s), rel=1e-9)


def test_shared_replicas_prefill_the_high_class_first(profile):
    # one shared replica gets a burst of both classes at once: the high class's prompts go first
    rng = np.random.default_rng(15)
    n = 80
    arr = np.sort(rng.uniform(0, 5, n))
    work = Workload("burst", arr, np.full(n, 3000), np.full(n, 20), high_priority=np.arange(n) % 2 == 0)
    hp, lp = specs(max_replicas=1)
    r = simulate_day(work, (hp, lp), profile, SimConfig(policy="static", share_classes=True))
    assert r.share_changes == 0  # static never plans: the classes stay apart
    from runtime.capacity.sim import _Class, _Pool

    cfg = SimConfig(policy="static")
    n_ticks = 200
    classes = [_Class(s, work, m, n_ticks, 1.0) for s, m in zip((hp, lp), (work.high_priority, ~work.high_priority),
                                                               strict=True)]
    pool = _Pool(hp, profile, classes, n_ticks, 1.0, cfg)
    for k in range(n_ticks):
        pool.tick(k, float(k), None, [0, 1])
        for c in classes:
            c.c_tok[k] = c.cum_tok
    # by the time half of the high class's tokens are prefilled, the low class has had almost none
    half = np.searchsorted(classes[0].c_tok, classes[0].prompt.sum() / 2)
    assert classes[1].c_tok[half] < 0.1 * classes[1].prompt.sum()
    assert classes[0].c_tok[-1] == pytest.approx(classes[0].prompt.sum())
    assert classes[1].c_tok[-1] == pytest.approx(classes[1].prompt.sum())


@needs_traces
def test_cli_runs_the_oracle_and_the_levers_on_a_short_slice(tmp_path, capsys):
    js = tmp_path / "cap.json"
    rc = cli_main(["simulate", "capacity", "--trace", str(CONV), "--hours", "0.05", "--start-hour", "13",
                   "--policy", "both,oracle", "--share-classes", "--pack-decode", "--warm-wake-s", "10",
                   "--oracle-window-s", "10", "--oracle-load-headroom", "1", "--cold-start-s", "5",
                   "--cold-start-power-fraction", "0.25", "--json", str(js), "--plot", ""])
    assert rc == 0
    rows = json.loads(js.read_text())
    assert [r["policy"] for r in rows] == ["static", "both", "oracle"]
    assert all(r["unfinished"] == 0 for r in rows)
    assert cli_main(["simulate", "capacity", "--trace", str(CONV), "--warm-wake-s", "-1"]) == 2
    assert "warm tier" in capsys.readouterr().err
    assert cli_main(["simulate", "capacity", "--trace", str(CONV), "--cold-start-power-fraction", "-0.5"]) == 2
    assert "cold_start_power_fraction" in capsys.readouterr().err
    assert cli_main(["simulate", "capacity", "--trace", str(CONV), "--oracle-load-headroom", "0.5"]) == 2
    assert "load_headroom" in capsys.readouterr().err


def test_oracle_holds_a_replica_needed_again_before_a_restart_pays(profile):
    # cold start 1e5 J vs 320 W idle: a replica needed again within ~312 s is cheaper kept than restarted
    rng = np.random.default_rng(16)
    arr = np.sort(np.concatenate([rng.uniform(0, 60, 60), rng.uniform(260, 320, 60), rng.uniform(1400, 1460, 60)]))
    n = len(arr)
    work = Workload("gaps", arr, np.full(n, 800), np.full(n, 40), high_priority=np.ones(n, dtype=bool))
    hp, lp = (s.model_copy(update={"cold_start_energy_j": 1e5}) for s in specs(max_replicas=2))
    r = simulate_day(work, (hp, lp), profile, SimConfig(policy="oracle"))
    reps = r.pools[0].replicas
    assert reps[150:250].min() >= 1  # the 200 s gap: held
    assert reps[700:1200].max() == 0  # the 1080 s gap: released
    assert r.pools[0].cold_starts == 1  # only the start before the last burst (the day begins with the fleet up)


def test_after_a_split_the_low_pool_is_not_released_while_its_class_keeps_arriving(profile):
    # the classes share at low load; then the high class surges and they split: the low class rides the
    # high pool until its own pool has a ready replica. Those requests are the low pool's: it must not
    # count as idle and release its starting replica whenever a 10 s interval had no low request (it did:
    # start, release, start... every 10-30 s, so the low pool never served and each start was paid)
    rng = np.random.default_rng(17)
    quiet = np.sort(rng.uniform(0, 900, 540))
    surge, low = np.sort(rng.uniform(900, 1500, 7200)), np.arange(905.0, 1500.0, 25.0)  # a low request every 25 s
    arr = np.concatenate([quiet, surge, low])
    high = np.concatenate([rng.random(len(quiet)) < 0.5, np.ones(len(surge), bool), np.zeros(len(low), bool)])
    order = np.argsort(arr, kind="stable")
    n = len(arr)
    work = Workload("split", arr[order], np.full(n, 1500), np.full(n, 60), high_priority=high[order])
    r = simulate_day(work, specs(), profile, SimConfig(policy="both", share_classes=True, pack_decode=True))
    assert r.share_changes >= 2  # shared, then split by the surge
    lp = r.pools[1]
    assert lp.cold_starts <= 2
    assert not [t for t, why in lp.plans if t > 900 and "no request and no work" in why]
    assert lp.replicas[1000:1500].min() >= 1  # it started once and serves its class


def test_two_pools_under_a_budget_count_start_up_power_and_stay_below_it(profile, monkeypatch):
    # both+polca: the high pool plans within budget_fraction x P, the low pool within budget_fraction x
    # what the high pool's plan (serving and start-up power) leaves; together never above P
    import runtime.capacity.sim as sim

    planned: dict[float, dict[str, tuple[float, float | None]]] = {}
    startups: list[float] = []
    plan_pool = sim.plan_pool

    def recording(load, state, spec, prof, config, **kw):
        plan = plan_pool(load, state, spec, prof, config, **kw)
        if kw.get("replicas") is None:
            planned.setdefault(state.now_s, {})[spec.priority] = (plan.predicted_power_w + plan.startup_power_w,
                                                                  kw.get("power_budget_w"))
            startups.append(plan.startup_power_w)
        return plan

    monkeypatch.setattr(sim, "plan_pool", recording)
    budget = 10000.0
    r = simulate_day(synthetic(6.0, 600, seed=9), specs(), profile,
                     SimConfig(policy="both+polca", provisioned_power_w=budget, planner=PlannerConfig(budget_fraction=0.8)))
    assert len(planned) > 50 and r.polca_capped_s > 0
    for pools in planned.values():
        high_w, high_budget = pools["high"]
        assert high_budget == budget and high_w <= 0.8 * budget + 1e-6
        if "low" in pools:
            low_w, low_budget = pools["low"]
            assert low_budget == pytest.approx(budget - high_w)
            assert high_w + low_w <= budget
    assert max(startups) > 0  # replicas were started under the budget, their start-up power priced
