"""Trace files in the public formats: detection, time units, lengths, prompts and clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtime.loadtest.traces import detect_format, load_trace, parse_datetime_s
from runtime.loadtest.workload import WorkloadSpec, build_workload
from wattserve.errors import InvalidRequest

CLI = "import sys; from runtime.cli import main; sys.exit(main())"


def write(path, text: str):
    path.write_text(text)
    return path


def jsonl(path, records):
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def shape(rows):
    return [(r.t_s, r.input_tokens, r.output_tokens) for r in rows]


def test_azure_2023_and_2024_date_times(tmp_path):
    a23 = write(tmp_path / "a23.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:46.6805900,374,44\n")
    rows = load_trace(a23)
    assert shape(rows) == [(0.0, 374, 44), (pytest.approx(4.314579), 396, 109)]  # sorted by time
    a24 = write(tmp_path / "a24.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                "2024-05-10 00:00:00.009930+00:00,2162,5\n2024-05-10 00:00:01.259930+00:00,1,12\n")
    assert shape(load_trace(a24)) == [(0.0, 2162, 5), (pytest.approx(1.25), 1, 12)]


def test_burstgpt_csv_in_seconds(tmp_path):
    path = write(tmp_path / "BurstGPT_1.csv",
                 "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,472,18,490,Conversation log\n45,GPT-4,1087,0,1087,Conversation log\n"
                 "5.5,ChatGPT,10,20,30,API log\n")
    assert shape(load_trace(path)) == [(0.0, 472, 18), (0.5, 10, 20), (40.0, 1087, 0)]


def test_mooncake_jsonl_in_milliseconds_with_its_text(tmp_path):
    path = jsonl(tmp_path / "mooncake.jsonl", [
        {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47]},
        {"timestamp": 30535, "input_length": 6472, "output_length": 26, "hash_ids": [46]},
        {"timestamp": 30000, "input_length": 3, "output_length": 4, "text_input": "What is energy?"},
    ])
    rows = load_trace(path)
    assert shape(rows) == [(0.0, 6955, 52), (pytest.approx(2.518), 3, 4), (pytest.approx(3.053), 6472, 26)]
    assert rows[1].prompt == "What is energy?" and rows[0].prompt is None


def test_generic_columns_and_time_units(tmp_path):
    ms = write(tmp_path / "ms.csv", "arrival_time_ms,prompt_tokens,completion_tokens\n0,5,6\n250,7,8\n")
    assert shape(load_trace(ms)) == [(0.0, 5, 6), (0.25, 7, 8)]
    secs = jsonl(tmp_path / "s.jsonl", [{"time": 1.0, "input_tokens": 3, "output_tokens": 4},
                                        {"time": 3.5, "input_tokens": 5, "output_tokens": 6}])
    assert shape(load_trace(secs)) == [(0.0, 3, 4), (2.5, 5, 6)]
    assert shape(load_trace(secs, time_unit="ms")) == [(0.0, 3, 4), (0.0025, 5, 6)]  # forced
    epoch_ms = write(tmp_path / "e.csv", "timestamp,input_len,output_len\n1700000000000,1,2\n1700000001500,3,4\n")
    assert shape(load_trace(epoch_ms)) == [(0.0, 1, 2), (1.5, 3, 4)]  # epoch magnitude says ms
    iso = jsonl(tmp_path / "iso.jsonl", [{"created_at": "2024-01-01T00:00:00Z", "input_tokens": 1, "output_tokens": 2},
                                         {"created_at": "2024-01-01T00:00:02.5Z", "input_tokens": 3, "output_tokens": 4}])
    assert shape(load_trace(iso)) == [(0.0, 1, 2), (2.5, 3, 4)]


def test_vllm_custom_and_sharegpt_carry_prompts_and_no_times(tmp_path):
    custom = jsonl(tmp_path / "custom.jsonl", [{"prompt": "one two three", "output_tokens": 7}, {"prompt": "four five"}])
    rows = load_trace(custom)
    assert shape(rows) == [(None, 3, 7), (None, 2, 0)] and rows[0].prompt == "one two three"
    share = write(tmp_path / "sharegpt.json", json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Say hi to me"}, {"from": "gpt", "value": "Hi there you"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "no reply"}]},  # skipped, as vLLM does
    ]))
    rows = load_trace(share)
    assert shape(rows) == [(None, 4, 3)] and rows[0].prompt == "Say hi to me"


def test_untimed_traces_drive_process_arrivals_and_send_their_prompts(tmp_path):
    custom = jsonl(tmp_path / "custom.jsonl", [{"prompt": "one two three", "output_tokens": 7}, {"prompt": "four"}])
    reqs = list(build_workload(WorkloadSpec(arrival="auto", trace=str(custom), output_tokens=9, rate_per_s=5.0,
                                            max_output_tokens=100)) for _ in range(1))[0]
    first = [next(reqs) for _ in range(3)]
    assert [r.prompt for r in first] == ["one two three", "four", "one two three"]
    assert [r.max_tokens for r in first] == [7, 9, 7]  # no output length: --output-tokens
    assert all(r.send_at_s is not None for r in first)  # poisson
    with pytest.raises(InvalidRequest, match="no arrival times.*--arrival poisson"):
        next(build_workload(WorkloadSpec(arrival="trace", trace=str(custom))))


def test_detection_order_and_forced_formats(tmp_path):
    assert detect_format(["TIMESTAMP", "ContextTokens", "GeneratedTokens"]) == "azure"
    assert detect_format(["timestamp", "input_length", "output_length", "hash_ids"]) == "mooncake"
    assert detect_format(["timestamp", "prompt", "input_tokens", "output_tokens"]) == "generic"  # times win
    assert detect_format(["prompt"]) == "vllm-custom"
    assert detect_format(["a", "b"]) is None
    path = jsonl(tmp_path / "m.jsonl", [{"timestamp": 0, "input_length": 1, "output_length": 2}])
    with pytest.raises(InvalidRequest, match="format burstgpt needs a time column.*columns found: 'timestamp'"):
        load_trace(path, "burstgpt")
    with pytest.raises(InvalidRequest, match="unknown trace format 'nope'"):
        load_trace(path, "nope")


def test_unknown_columns_and_bad_values_are_refused_with_what_was_found(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [{"when": 1, "len_in": 2}])
    with pytest.raises(InvalidRequest) as exc:
        load_trace(path)
    text = str(exc.value)
    assert "columns found: 'when', 'len_in'" in text and "mooncake" in text and "burstgpt" in text
    bad = write(tmp_path / "bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,12x,3\n")
    with pytest.raises(InvalidRequest, match="record 1: ContextTokens '12x' is not a number"):
        load_trace(bad)
    with pytest.raises(InvalidRequest, match="has no rows"):
        load_trace(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(InvalidRequest, match="line 2: not a JSON object"):
        load_trace(write(tmp_path / "broken.jsonl", '{"prompt": "a"}\n{oops\n'))


def test_naive_date_times_are_utc():
    assert parse_datetime_s("1970-01-01 00:00:01.5") == 1.5
    assert parse_datetime_s("1970-01-01T00:00:01.12345678+00:00") == pytest.approx(1.123457)


def test_cli_says_what_it_found_without_a_traceback(tmp_path):
    path = jsonl(tmp_path / "odd.jsonl", [{"arrived": 1, "n": 2}])
    proc = subprocess.run([sys.executable, "-c", CLI, "loadtest", "--trace", str(path), "--no-progress",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "columns found: 'arrived', 'n'" in proc.stderr and "Traceback" not in proc.stderr
    help_text = subprocess.run([sys.executable, "-c", CLI, "loadtest", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    for name in ("azure", "burstgpt", "mooncake", "sharegpt", "vllm-custom", "generic"):
        assert name in help_text
