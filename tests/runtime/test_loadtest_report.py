"""Load-test pieces on known data: summary statistics, workloads, mixes, targets."""

from __future__ import annotations

import random
import statistics

import pytest

from runtime.loadtest.clients import Record, judge_budget
from runtime.loadtest.report import parse_slos, summarize, tpot_ms
from runtime.loadtest.runner import check_target, parse_power
from runtime.loadtest.workload import (
    Mix,
    PromptSource,
    TraceRow,
    WorkloadSpec,
    build_workload,
    load_trace,
    process_arrivals,
    trace_arrivals,
)
from wattserve.errors import InvalidRequest


def rec(i, ttft, e2e, tokens, itl=(), energy=None, ok=True, status="OK", expert="edge", **kw) -> Record:
    return Record(index=i, api="grpc", scheduled_s=None, sent_s=float(i), status=status, ok=ok, ttft_ms=ttft,
                  e2e_ms=e2e, itl_ms=list(itl), prompt_tokens=10, completion_tokens=tokens, expert=expert,
                  energy_j=energy, energy_source="modeled:cpu" if energy is not None else "", **kw)


def test_summary_on_known_data():
    records = [
        rec(0, 10.0, 100.0, 10, itl=[10.0, 10.0], energy=1.0),
        rec(1, 20.0, 200.0, 10, itl=[20.0], energy=2.0),
        rec(2, 30.0, 300.0, 10, itl=[30.0], energy=3.0, expert="cloud"),
        rec(3, 40.0, 400.0, 10, itl=[40.0], energy=4.0, expert="cloud"),
        rec(4, None, 5.0, 0, ok=False, status="RESOURCE_EXHAUSTED"),
        rec(5, None, 5.0, 0, ok=False, status="RESOURCE_EXHAUSTED"),
        rec(6, None, 5.0, 0, ok=False, status="INVALID_ARGUMENT", error="prompt has 6955 tokens"),
    ]
    s = summarize(records, duration_s=2.0, slos={"ttft": 25.0})
    assert (s["num_prompts"], s["completed"], s["failed"]) == (7, 4, 3)
    assert s["total_output_tokens"] == 40 and s["total_input_tokens"] == 40
    assert s["request_throughput"] == 2.0 and s["output_throughput"] == 20.0 and s["total_token_throughput"] == 40.0
    # numpy's linear interpolation on [10, 20, 30, 40]
    assert s["mean_ttft_ms"] == 25.0 and s["median_ttft_ms"] == 25.0
    assert s["p90_ttft_ms"] == pytest.approx(37.0) and s["p99_ttft_ms"] == pytest.approx(39.7)
    assert s["std_ttft_ms"] == pytest.approx(statistics.pstdev([10, 20, 30, 40]))
    # TPOT = (e2e - ttft) / (tokens - 1): 10, 20, 30, 40
    assert s["mean_tpot_ms"] == pytest.approx(25.0) and s["p99_tpot_ms"] == pytest.approx(39.7)
    # every inter-chunk gap counts: [10, 10, 20, 30, 40]
    assert s["mean_itl_ms"] == pytest.approx(22.0) and s["median_itl_ms"] == 20.0
    assert s["p90_e2el_ms"] == pytest.approx(370.0)
    assert s["request_goodput"] == 1.0  # two requests within TTFT 25 ms, over 2 s
    assert s["total_energy_j"] == 10.0 and s["energy_per_output_token_j"] == 0.25
    assert s["energy_per_token_j"] == pytest.approx(10.0 / 80)
    assert s["mean_energy_per_request_j"] == 2.5 and s["p99_energy_per_request_j"] == pytest.approx(3.97)
    assert s["goodput_requests_per_joule"] == pytest.approx(0.2)
    assert s["goodput_output_tokens_per_joule"] == pytest.approx(2.0)
    assert s["energy_sources"] == {"modeled:cpu": 4}
    assert s["errors_by_status"] == {"RESOURCE_EXHAUSTED": 2, "INVALID_ARGUMENT": 1}
    assert s["first_error_by_status"] == {"RESOURCE_EXHAUSTED": "", "INVALID_ARGUMENT": "prompt has 6955 tokens"}
    assert s["per_expert"]["cloud"]["completed"] == 2 and s["per_expert"]["cloud"]["energy_j"] == 7.0


def test_empty_run_has_no_statistics_but_a_valid_summary():
    s = summarize([rec(0, None, 1.0, 0, ok=False, status="UNAVAILABLE")], duration_s=1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] is None and s["energy_per_output_token_j"] is None
    assert s["errors_by_status"] == {"UNAVAILABLE": 1}



def test_a_run_whose_requests_failed_says_why_on_screen(capsys):
    from runtime.cli.loadtest import _print_summary

    why = "prompt has 6955 tokens, but expert 'edge' allows at most 2048 tokens in total"
    records = [rec(i, None, 1.0, 0, ok=False, status="INVALID_ARGUMENT", error=why if i else "x" * 400) for i in range(3)]
    _print_summary(summarize(records, duration_s=1.0))
    out = capsys.readouterr().out
    assert "INVALID_ARGUMENT x3" in out and "first INVALID_ARGUMENT" in out and "x" * 297 + "..." in out
    _print_summary(summarize(records[1:], duration_s=1.0))
    assert why in capsys.readouterr().out


def test_tpot_needs_two_tokens_and_budgets_are_judged():
    assert tpot_ms(rec(0, 10.0, 50.0, 1)) is None
    r = rec(0, 10.0, 50.0, 5, energy=2.0, energy_budget_j=1.0, latency_budget_ms=100.0)
    judge_budget(r)
    assert r.budget_met is False
    r = rec(0, 10.0, 50.0, 5, energy=0.5, energy_budget_j=1.0)
    judge_budget(r)
    assert r.budget_met is True
    s = summarize([rec(0, 10.0, 150.0, 5, energy=2.0, energy_budget_j=1.0, latency_budget_ms=100.0)], 1.0)
    assert s["budget_violations"] == {"energy": 1, "latency": 1}


def test_slo_parsing():
    assert parse_slos(["ttft:500 tpot:50", "e2el:3000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 3000.0}
    with pytest.raises(InvalidRequest, match="must be one of"):
        parse_slos(["latency:5"])
    with pytest.raises(InvalidRequest, match="not a number"):
        parse_slos(["ttft:fast"])


def test_trace_loading_and_scaling(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,879,55\n"
    )
    rows = load_trace(path)
    assert [r.input_tokens for r in rows] == [374, 396, 879]
    assert rows[0].t_s == 0.0 and rows[2].t_s == pytest.approx(4.541877)
    sent = list(trace_arrivals(rows, 0.5, 1.0, random.Random(0)))
    assert [t for t, _ in sent] == pytest.approx([0.0, 2.1572895, 2.2709385])
    doubled = list(trace_arrivals(rows, 1.0, 2.0, random.Random(0)))
    assert len(doubled) == 6 and [t for t, _ in doubled] == sorted(t for t, _ in doubled)
    assert max(t for t, _ in doubled) <= rows[-1].t_s  # the copies stay within the trace's span
    offset = list(trace_arrivals(rows, 1.0, 1.0, random.Random(0), offset_s=4.0))
    assert len(offset) == 2 and offset[0][0] == pytest.approx(0.314579, abs=1e-5)


def test_thinning_keeps_about_the_asked_fraction():
    rows = [TraceRow(float(i), 10, 10) for i in range(4000)]
    kept = list(trace_arrivals(rows, 1.0, 0.25, random.Random(1)))
    assert 900 < len(kept) < 1100


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_spread():
    for shape, cv in ((1.0, 1.0), (0.25, 2.0), (4.0, 0.5)):
        times = list(_take(process_arrivals(20.0, shape, random.Random(3)), 20000))
        gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
        assert statistics.mean(gaps) == pytest.approx(1 / 20.0, rel=0.05)
        assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(cv, rel=0.08)


def _take(it, n):
    for _, x in zip(range(n), it, strict=False):
        yield x


def test_prompts_hit_the_token_count_with_a_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    src = PromptSource(random.Random(0), tokenizer_dir=str(tiny_llama))
    for n in (1, 7, 64):
        assert len(tok(src.make(n), add_special_tokens=False).input_ids) == n
    assert len(PromptSource(random.Random(0)).make(12).split()) == 12


def test_prompt_file_and_workload_mixes(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "first"}\n{"prompt": "second"}\n')
    spec = WorkloadSpec(arrival="closed", input_tokens=5, output_tokens=3, prompt_file=str(prompts),
                        model_mix="auto=1,edge=1", priority_mix="high=1,low=1", energy_budget_mix="none=1,2.5=1")
    reqs = list(_take(build_workload(spec), 400))
    assert [r.prompt for r in reqs[:3]] == ["first", "second", "first"]
    assert all(r.send_at_s is None and r.max_tokens == 3 for r in reqs)
    assert {r.expert for r in reqs} == {"", "edge"} and {r.priority for r in reqs} == {"high", "low"}
    assert {r.energy_budget_j for r in reqs} == {None, 2.5}
    again = list(_take(build_workload(spec), 400))
    assert [(r.expert, r.priority) for r in again] == [(r.expert, r.priority) for r in reqs]  # seeded


def test_lengths_are_capped_and_bad_specs_rejected():
    spec = WorkloadSpec(arrival="poisson", rate_per_s=10, input_tokens=5000, output_tokens=900,
                        max_input_tokens=64, max_output_tokens=16)
    r = next(build_workload(spec))
    assert (r.input_tokens, r.max_tokens, len(r.prompt.split())) == (64, 16, 64)
    with pytest.raises(InvalidRequest, match="needs a trace"):
        next(build_workload(WorkloadSpec(arrival="trace")))
    with pytest.raises(InvalidRequest, match="cannot read"):
        Mix("high=lots")
    with pytest.raises(InvalidRequest, match="cannot read"):
        next(build_workload(WorkloadSpec(priority_mix="urgent=1")))


def test_only_loopback_targets_without_allow_remote():
    for ok in ("127.0.0.1:50051", "localhost:1", "http://127.0.0.1:8000", "http://[::1]:8000", "[::1]:50051"):
        check_target(ok, allow_remote=False)
    for bad in ("10.0.0.5:50051", "http://example.com:8000", "192.168.1.2:1"):
        with pytest.raises(InvalidRequest, match="--allow-remote"):
            check_target(bad, allow_remote=False)
        check_target(bad, allow_remote=True)


def test_power_is_read_from_prometheus_text():
    text = (
        "# TYPE wattserve_gpu_power_watts gauge\n"
        'wattserve_gpu_power_watts{expert="a",replica="0",device="nvml:0",energy_source="measured:nvml"} 250.0\n'
        'wattserve_gpu_power_watts{expert="b",replica="0",device="nvml:1",energy_source="measured:nvml"} 150.0\n'
        "# TYPE wattserve_gpu_power_limit_watts gauge\n"
        'wattserve_gpu_power_limit_watts{expert="a",replica="0",device="nvml:0"} 700.0\n'
        "# TYPE wattserve_power_budget_watts gauge\nwattserve_power_budget_watts 600.0\n"
        "# TYPE wattserve_power_cap_events counter\n"
        'wattserve_power_cap_events_total{kind="t1"} 3.0\n'
    )
    p = parse_power(text, 1.5)
    assert (p.gpu_power_w, p.power_limit_w, p.budget_w, p.cap_events, p.t_s) == (400.0, 700.0, 600.0, 3.0, 1.5)
