"""MoE² and the baselines on plain values: budgets, queues, throttling, infeasibility, ensembles."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from router.base import Candidate, RequestFeatures, RouterSettings
from router.cost import CostModel
from router.ensemble import EnsembleGains, EnsembleMeasure
from router.gate import PriorGate
from router.policies import make_policy
from router.policies.moe2 import MoE2
from router.quality import combine
from router.selector import Item, exhaustive_subset
from tests.router.helpers import prof
from wattserve.errors import BudgetInfeasible

PRIOR = {"edge": 0.35, "mid": 0.6, "cloud": 0.8}
SETTINGS = RouterSettings(quality_prior=PRIOR, aggregation_ms=5.0)


def pool(**overrides):
    spec = {"edge": dict(power_w=10.0, step_ms=5.0), "mid": dict(power_w=100.0, step_ms=10.0),
            "cloud": dict(power_w=400.0, step_ms=20.0)}
    cands = []
    for name, kw in spec.items():
        kw = {**kw, **overrides.get(name, {})}
        cands.append(Candidate(name, 0, True, 0, prof(name, **kw)))
    return cands


def req(**kw):
    base = dict(prompt_chars=40, max_tokens=10, gate=PriorGate(PRIOR)(""))
    base.update(kw)
    return RequestFeatures(**base)


def policy(**kw):
    return MoE2(rng=random.Random(0), cost=CostModel(), settings=dataclasses.replace(SETTINGS, **kw))


def energy(expert, tokens_in=10, n=10):
    return CostModel().predict(next(c for c in pool() if c.expert == expert).profile, expert, tokens_in, n).energy_j


def test_no_budget_answers_from_the_highest_weight_expert():
    plan = policy().plan(req(), pool())
    assert plan.subset == ("cloud", "mid", "edge") and plan.ranked[0].expert == "cloud"
    assert plan.gate == "prior" and sum(plan.weights.values()) == pytest.approx(1.0)
    assert plan.predicted_energy_j == pytest.approx(energy("cloud"))


def test_energy_budget_decides_between_edge_and_cloud():
    tight = policy().plan(req(energy_budget_j=1.5 * energy("edge")), pool())
    assert tight.subset == ("edge",) and tight.predicted_energy_j <= 1.5 * energy("edge")
    mid = policy().plan(req(energy_budget_j=energy("mid") + energy("edge")), pool())
    assert mid.subset == ("mid", "edge")
    loose = policy().plan(req(energy_budget_j=energy("cloud") * 1.01), pool())
    assert loose.ranked[0].expert == "cloud"


def test_latency_budget_avoids_a_queued_expert():
    free = policy().plan(req(latency_budget_ms=300), pool())
    assert free.ranked[0].expert == "cloud"  # 9 steps x 20 ms fits
    queued = policy().plan(req(latency_budget_ms=300), pool(cloud=dict(running=4, waiting=4)))
    assert queued.ranked[0].expert == "mid" and "cloud" not in queued.subset


def test_infeasible_budget_rejects_naming_the_cheapest_or_serves_it_flagged():
    with pytest.raises(BudgetInfeasible) as err:
        policy().plan(req(energy_budget_j=1e-6), pool())
    assert "the cheapest plan is edge" in str(err.value)
    assert err.value.details["cheapest_energy_j"] == pytest.approx(energy("edge"))
    assert err.value.grpc_code == "FAILED_PRECONDITION"
    # the caller must change the request: HTTP 400 (OpenAI's BadRequestError) naming the budget
    assert err.value.http_status == 400 and err.value.details["param"] == "energy_budget_j"
    plan = policy(infeasible="serve_cheapest").plan(req(energy_budget_j=1e-6), pool())
    assert plan.subset == ("edge",) and plan.budget_exceeded and "BUDGET EXCEEDED" in plan.reason


def test_unknown_costs_cannot_meet_a_budget():
    cands = [Candidate("cloud", 0, True, 0, None)]
    assert policy().plan(req(), cands).subset == ("cloud",)  # no budget: fine
    with pytest.raises(BudgetInfeasible, match="no cost measured yet"):
        policy().plan(req(energy_budget_j=5.0), cands)


def test_throttled_requests_only_see_the_cheapest_expert_in_every_policy():
    for name in ("moe2", "least_loaded", "random", "round_robin", "cheapest", "strongest", "threshold"):
        p = make_policy(name, rng=random.Random(1), settings=SETTINGS)
        plan = p.plan(req(throttled=True, throttle_reason="tenant 'a' at 90% of its energy budget"), pool())
        assert {c.expert for c in plan.ranked} == {"edge"}, name
        assert "cheapest expert only" in plan.reason


def test_score_mode_runs_the_subset_and_adds_aggregation_time():
    r = req(mode="score", max_tokens=0, choice_tokens=(2, 3), energy_budget_j=1e9)
    plan = policy().plan(r, pool())
    assert set(plan.subset) == {"edge", "mid", "cloud"}
    m = CostModel()
    parts = [m.predict(c.profile, c.expert, r.tokens_in, 0, queue=False, scored_tokens=r.scored_tokens) for c in pool()]
    assert plan.predicted_energy_j == pytest.approx(sum(p.energy_j for p in parts))
    assert plan.predicted_latency_ms == pytest.approx(max(p.latency_ms for p in parts) + 5.0)


def test_plans_never_exceed_budgets_and_match_the_exhaustive_optimum():
    rng = random.Random(7)
    for _ in range(300):
        cands = [Candidate(f"e{i}", 0, True, 0, prof(f"e{i}", power_w=rng.uniform(5, 500), step_ms=rng.uniform(1, 50),
                                                     running=rng.randint(0, 8), waiting=rng.randint(0, 4)))
                 for i in range(rng.randint(1, 7))]
        prior = {c.expert: rng.random() for c in cands}
        gate = PriorGate(prior)("")
        r = req(gate=gate, max_tokens=rng.randint(1, 50), energy_budget_j=rng.uniform(0.01, 5),
                latency_budget_ms=rng.choice([None, rng.uniform(10, 3000)]), mode=rng.choice(["generate", "score"]),
                choice_tokens=(3, 4))
        price = rng.choice([0.0, 0.0, rng.uniform(0, 0.5)])
        p = MoE2(cost=CostModel(), settings=RouterSettings(quality_prior=prior, aggregation_ms=2.0, quality_per_j=price))
        m = CostModel()
        est = {c.expert: m.predict(c.profile, c.expert, r.tokens_in, r.tokens_out, queue=r.mode == "generate", scored_tokens=r.scored_tokens) for c in cands}
        fits = [c.expert for c in cands if est[c.expert].energy_j <= r.energy_budget_j
                and (r.latency_budget_ms is None or est[c.expert].latency_ms <= r.latency_budget_ms)]
        if r.mode == "generate":
            try:
                plan = p.plan(r, cands)
            except BudgetInfeasible:
                assert fits == []
                continue
            # one expert answers: the best q - price x E among those that fit alone (fall-backs fit too)
            assert set(plan.subset) == set(fits)
            best = max(prior[e] - price * est[e].energy_j for e in fits)
            top = plan.subset[0]
            assert prior[top] - price * est[top].energy_j == pytest.approx(best)
            assert plan.predicted_energy_j == pytest.approx(est[top].energy_j)
            assert plan.predicted_energy_j <= r.energy_budget_j * (1 + 1e-9)
            continue
        items = [Item(gate.weights[c.expert] * gate.quality[c.expert], est[c.expert].energy_j, est[c.expert].latency_ms)
                 for c in cands]
        if price:
            items = [it if it.value >= price * it.energy_j else Item(0.0, it.energy_j, it.latency_ms) for it in items]
            if all(it.value == 0 for it in items):
                # no expert is worth its joules: the price ranks, it does not refuse; one expert answers
                net = {e: gate.weights[e] * gate.quality[e] - price * est[e].energy_j for e in fits}
                try:
                    plan = p.plan(r, cands)
                except BudgetInfeasible:
                    assert fits == []
                    continue
                assert len(plan.subset) == 1 and plan.subset[0] in fits
                assert net[plan.subset[0]] == pytest.approx(max(net.values()))
                continue
        ref = exhaustive_subset(items, r.energy_budget_j, r.latency_budget_ms, 2.0)
        try:
            plan = p.plan(r, cands)
        except BudgetInfeasible:
            assert ref.indices == () or all(items[i].value == 0 for i in ref.indices)
            continue
        assert sum(est[e].energy_j for e in plan.subset) <= r.energy_budget_j * (1 + 1e-9)
        if r.latency_budget_ms is not None:
            assert plan.predicted_latency_ms <= r.latency_budget_ms
        got = sum(gate.weights[e] * gate.quality[e] for e in plan.subset)
        assert got == pytest.approx(ref.value)


def test_generate_answers_from_the_best_single_expert_that_fits():
    """The issue's example: A (q 0.6, 10 J), B and C (q 0.5, 5 J each), 10 J budget. {B, C} has the
    higher ensemble value (sum g q), but Generate answers from one expert: A fits alone and is better."""
    quality = {"A": 0.6, "B": 0.5, "C": 0.5}
    # power x compute time = energy: 10 tokens x 10 ms x 100 W / 1000 = 10 J; 5 J for the others
    cands = [Candidate("A", 0, True, 0, prof("A", power_w=100.0, step_ms=10.0)),
             Candidate("B", 0, True, 0, prof("B", power_w=50.0, step_ms=10.0)),
             Candidate("C", 0, True, 0, prof("C", power_w=50.0, step_ms=10.0))]
    settings = RouterSettings(quality_prior=quality)
    r = RequestFeatures(prompt_chars=1, prompt_tokens=1, max_tokens=10, gate=PriorGate(quality)(""))
    est = {c.expert: CostModel().predict(c.profile, c.expert, 1, 10) for c in cands}
    budget = est["A"].energy_j
    assert est["B"].energy_j + est["C"].energy_j <= budget < est["A"].energy_j + est["B"].energy_j
    g = PriorGate(quality)("")
    assert g.weights["B"] * 0.5 + g.weights["C"] * 0.5 > g.weights["A"] * 0.6  # the trap the old objective fell in
    plan = MoE2(cost=CostModel(), settings=settings).plan(dataclasses.replace(r, energy_budget_j=budget), cands)
    assert plan.ranked[0].expert == "A" and plan.subset[0] == "A"
    assert plan.predicted_energy_j == pytest.approx(est["A"].energy_j)
    assert "A answers" in plan.reason
    # Score still uses the subset: {B, C} is the better ensemble within 10 J
    sr = dataclasses.replace(r, mode="score", max_tokens=0, choice_tokens=(9,))
    se = {c.expert: CostModel().predict(c.profile, c.expert, sr.tokens_in, 0, queue=False, scored_tokens=sr.scored_tokens).energy_j for c in cands}
    score = MoE2(cost=CostModel(), settings=settings).plan(dataclasses.replace(sr, energy_budget_j=se["A"]), cands)
    assert set(score.subset) == {"B", "C"}
    # with a price, A must be worth its extra 5 J: q_A - q_B = 0.1 buys 5 J at up to 0.02 quality per J
    dear = MoE2(cost=CostModel(), settings=dataclasses.replace(settings, quality_per_j=0.021))
    assert dear.plan(r, cands).ranked[0].expert == "B"
    assert MoE2(cost=CostModel(), settings=dataclasses.replace(settings, quality_per_j=0.019)).plan(
        r, cands).ranked[0].expert == "A"
    # the request's own price (its tenant's) wins over the configured one
    assert dear.plan(dataclasses.replace(r, quality_per_j=0.0), cands).ranked[0].expert == "A"


def test_exploration_stays_within_the_budgets_and_never_touches_pinned_requests():
    cands = pool()
    p = policy()
    p.rng = random.Random(3)
    budget = energy("mid") * 1.01  # cloud does not fit
    picks = [p.plan(req(energy_budget_j=budget, explore_share=0.5), cands) for _ in range(200)]
    first = [pl.ranked[0].expert for pl in picks]
    assert "cloud" not in first and 60 < first.count("edge") < 140  # explored about half the time
    assert all(pl.predicted_energy_j <= budget for pl in picks)
    assert any("exploring" in pl.reason for pl in picks)
    assert {p.plan(req(expert="cloud", explore_share=1.0), cands).ranked[0].expert for _ in range(20)} == {"cloud"}
    assert {p.plan(req(explore_share=0.0), cands).ranked[0].expert for _ in range(20)} == {"cloud"}


def test_price_of_energy_answers_from_the_lagrangian_optimum():
    e = {x: energy(x) for x in PRIOR}
    for price in (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        plan = policy(quality_per_j=price).plan(req(), pool())
        best = max(PRIOR, key=lambda x: PRIOR[x] - price * e[x])
        assert plan.ranked[0].expert == best, price
    # two experts: the price is a threshold on the quality gain per extra joule
    two = [c for c in pool() if c.expert != "mid"]
    flip = (PRIOR["cloud"] - PRIOR["edge"]) / (e["cloud"] - e["edge"])
    assert policy(quality_per_j=flip * 0.99).plan(req(), two).ranked[0].expert == "cloud"
    assert policy(quality_per_j=flip * 1.01).plan(req(), two).ranked[0].expert == "edge"
    # the ensemble keeps an expert while g_i q_i >= price x E_i
    r = req(mode="score", max_tokens=0, choice_tokens=(2,))
    g = PriorGate(PRIOR)("")
    est = {c.expert: CostModel().predict(c.profile, c.expert, r.tokens_in, 0, queue=False, scored_tokens=r.scored_tokens).energy_j for c in pool()}
    price = g.weights["cloud"] * g.quality["cloud"] / est["cloud"] * 1.01
    assert "cloud" not in policy(quality_per_j=price).plan(r, pool()).subset


def test_score_without_a_budget_is_served_when_no_expert_is_worth_its_joules():
    """A long few-shot Score request at the default price: every g_i q_i < lam E_i. With no budget
    it must still be answered, by the expert with the best g_i q_i - lam E_i (not refused)."""
    r = req(mode="score", max_tokens=0, prompt_chars=4000, choice_tokens=(5, 5, 5, 5))
    cands = pool()
    p = policy(quality_per_j=0.5)
    gate = r.gate
    est = {c.expert: CostModel().predict(c.profile, c.expert, r.tokens_in, 0, queue=False, scored_tokens=r.scored_tokens).energy_j for c in cands}
    assert all(gate.weights[e] * gate.quality[e] < 0.5 * est[e] for e in est)  # nobody is worth it
    plan = p.plan(r, cands)
    best = max(est, key=lambda e: gate.weights[e] * gate.quality[e] - 0.5 * est[e])
    assert plan.subset == (best,) and not plan.budget_exceeded
    # with a budget nothing fits, the budget (not the price) refuses it
    with pytest.raises(BudgetInfeasible):
        p.plan(dataclasses.replace(r, energy_budget_j=min(est.values()) / 2), cands)


def test_renormalised_weights_and_the_ensemble():
    gate = PriorGate(PRIOR)("")
    sub = gate.renormalised(["edge", "cloud"])
    assert sum(sub.values()) == pytest.approx(1.0)
    assert sub["cloud"] / sub["edge"] == pytest.approx(gate.weights["cloud"] / gate.weights["edge"])
    mix = combine({"a": 0.75, "b": 0.25}, {"a": [0.0, -100.0], "b": [-100.0, 0.0]})
    assert mix == pytest.approx([0.75, 0.25])
    assert sum(combine({"a": 1.0}, {"a": [-1.0, -2.0, -3.0]})) == pytest.approx(1.0)


def test_baselines():
    cands = pool()
    r = req()
    assert make_policy("cheapest", settings=SETTINGS).plan(r, cands).subset == ("edge",)
    assert make_policy("strongest", settings=SETTINGS).plan(r, cands).subset == ("cloud",)
    rr = make_policy("round_robin", settings=SETTINGS)
    assert [rr.plan(r, cands).subset[0] for _ in range(4)] == ["cloud", "edge", "mid", "cloud"]
    picks = {make_policy("random", rng=random.Random(s), settings=SETTINGS).plan(r, cands).subset[0] for s in range(20)}
    assert picks == {"edge", "mid", "cloud"}
    th = RouterSettings(quality_prior=PRIOR, threshold=0.3)
    plan = make_policy("threshold", settings=th).plan(r, cands)
    assert plan.subset == ("cloud",) and plan.gate == "prior"  # gain 0.45 >= 0.3
    th = RouterSettings(quality_prior=PRIOR, threshold=0.5)
    assert make_policy("threshold", settings=th).plan(r, cands).subset == ("edge",)


def test_cascade_plans_cheapest_first_then_the_top_expert():
    plan = policy(cascade_below_logprob=-1.0).plan(req(), pool())
    assert plan.cascade == ("edge", "cloud") and plan.cascade_below_logprob == -1.0
    assert "cascade edge -> cloud" in plan.reason
    # both answers in a row must fit the latency budget (edge ~9 x 5 ms, cloud ~9 x 20 ms)
    assert policy(cascade_below_logprob=-1.0).plan(req(latency_budget_ms=200), pool()).cascade == ()
    assert policy(cascade_below_logprob=-1.0).plan(req(mode="score", max_tokens=0, choice_tokens=(1,)), pool()).cascade == ()
    assert policy().plan(req(), pool()).cascade == ()


def _gains(lifts: dict[tuple[str, ...], float], n: int = 200) -> EnsembleGains:
    """Measured lifts as ``quality ensemble`` writes them (wins/losses out of ``n`` items)."""
    out = []
    for experts, lift in lifts.items():
        wins = round(max(lift, 0.0) * n) + 5
        losses = wins - round(lift * n)
        out.append(EnsembleMeasure(tuple(sorted(experts)), n, 0.5, experts[0], 0.45, wins, losses))
    return EnsembleGains(out)


def _score_energy(r, cands=None):
    return {c.expert: CostModel().predict(c.profile, c.expert, r.tokens_in, 0, queue=False, scored_tokens=r.scored_tokens).energy_j
            for c in cands or pool()}


def test_score_adds_a_second_expert_only_when_its_measured_gain_pays():
    """Score starts from the best single expert (argmax q - lam E) and adds another only when the
    measured gain of the mix over what is already chosen is worth the added joules."""
    two = [c for c in pool() if c.expert != "mid"]
    r = req(mode="score", max_tokens=0, choice_tokens=(2, 3))
    e = _score_energy(r, two)
    lam = 0.5 * (PRIOR["cloud"] - PRIOR["edge"]) / e["cloud"]  # cloud's 0.45 more quality pays for it
    assert PRIOR["cloud"] - lam * e["cloud"] > PRIOR["edge"] - lam * e["edge"]

    def plan(lift, price=lam, **kw):
        # many items: the lifts here are small (edge's joules are a few percent of cloud's)
        settings = dataclasses.replace(SETTINGS, quality_per_j=price, ensemble=_gains({("cloud", "edge"): lift}, n=100_000))
        return MoE2(cost=CostModel(), settings=settings).plan(dataclasses.replace(r, **kw), two)

    # edge costs lam x E_edge in quality; a measured lift above that adds it, below it does not
    worth = lam * e["edge"]
    high, low = plan(worth * 1.5), plan(worth * 0.5)
    assert high.subset == ("cloud", "edge") and high.predicted_energy_j == pytest.approx(e["cloud"] + e["edge"])
    assert "measured ensemble gains" in high.reason
    assert low.subset == ("cloud",) and low.predicted_energy_j == pytest.approx(e["cloud"])
    assert "edge not added: measured gain" in low.reason
    # energy free: any positive measured gain is taken, a mix that spoils answers never is
    assert plan(0.005, price=0.0).subset == ("cloud", "edge")
    assert plan(-0.02, price=0.0).subset == ("cloud",)
    # the high gain, but the pair does not fit the budget: the best single expert alone
    tight = plan(worth * 1.5, energy_budget_j=e["cloud"] * 1.001)
    assert tight.subset == ("cloud",) and "exceed the budget" in tight.reason
    # a budget only edge fits: edge alone, whatever the gain (the pair cannot fit either)
    assert plan(1.0, energy_budget_j=e["edge"] * 1.001).subset == ("edge",)
    with pytest.raises(BudgetInfeasible):
        plan(1.0, energy_budget_j=e["edge"] / 2)


def test_score_gain_counts_what_the_gate_says_the_added_expert_knows_better():
    """When the cheap expert answers first, adding the better one gains the gate's quality gap
    for this prompt plus the measured lift; that is weighed against its joules like any gain."""
    two = [c for c in pool() if c.expert != "mid"]
    r = req(mode="score", max_tokens=0, choice_tokens=(2, 3))
    e = _score_energy(r, two)
    gap = PRIOR["cloud"] - PRIOR["edge"]
    lam = 1.5 * gap / (e["cloud"] - e["edge"])  # at this price edge answers first
    settings = dataclasses.replace(SETTINGS, quality_per_j=lam, ensemble=_gains({("cloud", "edge"): 0.0}))
    plan = MoE2(cost=CostModel(), settings=settings).plan(r, two)
    assert plan.subset == ("edge",)  # gap < lam E_cloud: cloud is not worth adding either
    rich = dataclasses.replace(settings, ensemble=_gains({("cloud", "edge"): lam * e["cloud"] - gap + 0.01}))
    assert set(MoE2(cost=CostModel(), settings=rich).plan(r, two).subset) == {"edge", "cloud"}


def test_score_with_measured_gains_keeps_budgets_and_stops_only_when_nothing_pays():
    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(1, 5)
        cands = [Candidate(f"e{i}", 0, True, 0, prof(f"e{i}", power_w=rng.uniform(5, 500), step_ms=rng.uniform(1, 50)))
                 for i in range(n)]
        prior = {c.expert: rng.random() for c in cands}
        names = sorted(prior)
        lifts = {s: rng.uniform(-0.1, 0.3) for k in (2, 3) for s in itertools.combinations(names, k)
                 if rng.random() < 0.8}
        gains = _gains(lifts)
        r = req(gate=PriorGate(prior)(""), mode="score", max_tokens=0, choice_tokens=(3, 4),
                energy_budget_j=rng.choice([None, rng.uniform(0.001, 0.05)]),
                latency_budget_ms=rng.choice([None, rng.uniform(0.5, 20)]))
        price = rng.choice([0.0, rng.uniform(0, 20)])
        p = MoE2(cost=CostModel(), settings=RouterSettings(quality_prior=prior, aggregation_ms=0.5, quality_per_j=price,
                                                           ensemble=gains))
        est = {c.expert: CostModel().predict(c.profile, c.expert, r.tokens_in, 0, queue=False, scored_tokens=r.scored_tokens) for c in cands}

        def fits(s, r=r, est=est):
            return ((r.energy_budget_j is None or sum(est[x].energy_j for x in s) <= r.energy_budget_j * (1 + 1e-9))
                    and (r.latency_budget_ms is None
                         or max(est[x].latency_ms for x in s) + (0.5 if len(s) > 1 else 0) <= r.latency_budget_ms))

        alone = [x for x in names if fits([x])]
        try:
            plan = p.plan(r, cands)
        except BudgetInfeasible:
            assert alone == []
            continue
        s = list(plan.subset)
        assert fits(s)
        net = {x: prior[x] - price * est[x].energy_j for x in alone}
        assert any(net[x] == pytest.approx(max(net.values())) for x in s)  # it started from the best single
        for x in alone:  # nothing left out would have paid for itself
            if x in s:
                continue
            dq = gains.gain(prior, s, x)
            assert dq is None or dq <= 0 or dq < price * est[x].energy_j or not fits([*s, x])


def test_score_first_choice_follows_the_shape_of_the_request():
    """Equal predicted quality: Score's answering expert is the cheaper one for *this* request.
    "big_vocab" has cheap prompt tokens and dear scored (choice) tokens, "deep" the reverse."""
    gate = PriorGate({"deep": 0.5, "big_vocab": 0.5})("")
    cands = [Candidate("deep", 0, True, 0, prof("deep", power_w=5.0, step_ms=29.0)),
             Candidate("big_vocab", 0, True, 0, prof("big_vocab", power_w=5.0, step_ms=37.0))]
    cands = [dataclasses.replace(c, profile=dataclasses.replace(c.profile, prefill_ms_per_token=pf))
             for c, pf in zip(cands, (4.0, 2.9), strict=True)]
    settings = dataclasses.replace(SETTINGS, quality_prior={"deep": 0.5, "big_vocab": 0.5}, quality_per_j=0.02,
                                   ensemble=_gains({("big_vocab", "deep"): -0.02}))

    def first(prompt_chars, choice_tokens):
        r = RequestFeatures(prompt_chars=prompt_chars, max_tokens=0, gate=gate, mode="score", choice_tokens=choice_tokens)
        return MoE2(cost=CostModel(), settings=settings).plan(r, cands).subset

    assert first(120, (5, 5, 5, 5)) == ("deep",)          # short question, sentence-long choices
    assert first(2400, (2, 2, 2, 2)) == ("big_vocab",)    # long few-shot prompt, short choices
