"""Drives a load test: sends the workload on schedule (open loop) or as slots free (closed loop),
within a duration and a request cap, shows progress, samples the server's power from
``/metrics``, and returns every request's record.

Bounded by construction: no request is sent after ``duration_s`` or beyond ``max_requests``, and
requests still running ``timeout_s`` after the last send are cancelled (recorded as
``CLIENT_CANCELLED``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from wattserve.errors import InvalidRequest

from .clients import Record
from .workload import RequestSpec


def check_target(target: str, allow_remote: bool) -> None:
    """Refuse non-loopback targets unless the operator named one explicitly with allow_remote."""
    host = urlparse(target).hostname if "://" in target else target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise InvalidRequest(f"target {target} is not a loopback address; pass --allow-remote to load-test it")


@dataclass(slots=True)
class PowerSample:
    t_s: float  # since run start
    gpu_power_w: float
    cpu_power_w: float
    power_limit_w: float  # sum of the GPUs' enforced limits (caps lower it)
    budget_w: float | None
    cap_events: float


class PowerSampler:
    """Scrapes a wattserve ``/metrics`` endpoint every ``interval_s``."""

    def __init__(self, url: str, interval_s: float = 1.0, api_key: str | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.interval_s = interval_s
        self.samples: list[PowerSample] = []
        self.error = ""

    async def run(self, started: float) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), headers=self.headers) as session:
            while True:
                try:
                    async with session.get(self.url) as resp:
                        text = await resp.text()
                        if resp.status != 200:  # e.g. 401/403: /metrics needs an operator key
                            raise ValueError(f"{self.url} answered HTTP {resp.status}")
                    self.samples.append(parse_power(text, time.perf_counter() - started))
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    self.error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(self.interval_s)


def parse_power(text: str, t_s: float) -> PowerSample:
    sums = {"wattserve_gpu_power_watts": 0.0, "wattserve_cpu_power_watts": 0.0, "wattserve_gpu_power_limit_watts": 0.0,
            "wattserve_power_cap_events_total": 0.0}
    budget = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in sums:
                sums[s.name] += s.value
            elif s.name == "wattserve_power_budget_watts":
                budget = s.value
    return PowerSample(t_s, sums["wattserve_gpu_power_watts"], sums["wattserve_cpu_power_watts"],
                       sums["wattserve_gpu_power_limit_watts"], budget, sums["wattserve_power_cap_events_total"])


@dataclass(slots=True)
class Bounds:
    duration_s: float = 60.0
    max_requests: int = 1000
    max_concurrency: int | None = None  # open loop: cap on requests in flight; closed loop: the loop size
    timeout_s: float = 120.0  # how long in-flight requests may run after sending stops


@dataclass(slots=True)
class RunResult:
    records: list[Record]
    duration_s: float  # first send -> last completion
    started_unix_s: float
    power: list[PowerSample] = field(default_factory=list)
    power_error: str = ""


class Progress:
    """A live line on stderr: sent, finished, failed, current rate (over the last 5 s)."""

    def __init__(self, total: int, enabled: bool = True, stream=sys.stderr) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", file=stream, mininterval=0.25, dynamic_ncols=True,
                            desc="loadtest")
        self.sent = self.ok = self.failed = 0
        self._done_times: deque[float] = deque()

    def on_send(self) -> None:
        self.sent += 1
        self._refresh()

    def on_done(self, rec: Record) -> None:
        self.ok += rec.ok
        self.failed += not rec.ok
        now = time.perf_counter()
        self._done_times.append(now)
        while self._done_times and self._done_times[0] < now - 5.0:
            self._done_times.popleft()
        if self.bar is not None:
            self.bar.update(1)
        self._refresh()

    def _refresh(self) -> None:
        if self.bar is not None:
            rate = len(self._done_times) / 5.0
            self.bar.set_postfix_str(f"sent={self.sent} ok={self.ok} failed={self.failed} rate={rate:.1f}/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()


async def run_load(workload: Iterable[RequestSpec], client, bounds: Bounds, *, progress: Progress | None = None,
                   sampler: PowerSampler | None = None) -> RunResult:
    """Send ``workload`` through ``client`` (an entered GrpcClient/OpenAIClient) within ``bounds``."""
    progress = progress or Progress(bounds.max_requests, enabled=False)
    started = time.perf_counter()
    started_unix = time.time()
    sampler_task = asyncio.create_task(sampler.run(started)) if sampler else None
    records: list[Record] = []
    specs = _bounded(iter(workload), bounds, started)
    try:
        first = next(specs, None)
        if first is not None and first.send_at_s is None:
            await _closed_loop(first, specs, client, bounds, started, records, progress)
        elif first is not None:
            await _open_loop(first, specs, client, bounds, started, records, progress)
    finally:
        progress.close()
        if sampler_task:
            sampler_task.cancel()
    end = max((r.sent_s + (r.e2e_ms or 0) / 1000.0 for r in records), default=0.0)
    begin = min((r.sent_s for r in records), default=0.0)
    records.sort(key=lambda r: r.index)
    return RunResult(records, max(end - begin, 1e-9), started_unix, sampler.samples if sampler else [],
                     sampler.error if sampler else "")


def _bounded(specs: Iterator[RequestSpec], bounds: Bounds, started: float) -> Iterator[RequestSpec]:
    for n, spec in enumerate(specs):
        if n >= bounds.max_requests:
            return
        if spec.send_at_s is not None and spec.send_at_s > bounds.duration_s:
            return
        if time.perf_counter() - started > bounds.duration_s:
            return
        yield spec


async def _one(client, spec: RequestSpec, started: float, records: list[Record], progress: Progress) -> None:
    progress.on_send()
    try:
        rec = await client.send(spec, started)
    except asyncio.CancelledError:
        rec = Record(index=spec.index, api=client.api, scheduled_s=spec.send_at_s, sent_s=time.perf_counter() - started,
                     status="CLIENT_CANCELLED", ok=False, target_input_tokens=spec.input_tokens, max_tokens=spec.max_tokens,
                     error="still running when the load test's time ran out")
        records.append(rec)
        progress.on_done(rec)
        raise
    records.append(rec)
    progress.on_done(rec)


async def _open_loop(first, specs, client, bounds: Bounds, started: float, records, progress) -> None:
    limit = asyncio.Semaphore(bounds.max_concurrency) if bounds.max_concurrency else None
    tasks: set[asyncio.Task] = set()

    async def launch(spec: RequestSpec) -> None:
        if limit is not None:
            async with limit:
                await _one(client, spec, started, records, progress)
        else:
            await _one(client, spec, started, records, progress)

    spec = first
    while spec is not None:
        delay = spec.send_at_s - (time.perf_counter() - started)
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(launch(spec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        spec = next(specs, None)
    await _drain(tasks, bounds.timeout_s)


async def _closed_loop(first, specs, client, bounds: Bounds, started: float, records, progress) -> None:
    pending = iter([first])

    def take() -> RequestSpec | None:
        return next(pending, None) or next(specs, None)

    async def worker() -> None:
        while (spec := take()) is not None:
            await _one(client, spec, started, records, progress)

    workers = {asyncio.create_task(worker()) for _ in range(bounds.max_concurrency or 1)}
    # Workers stop taking work at the duration; what they run then gets timeout_s to finish.
    await asyncio.wait(workers, timeout=max(0.0, bounds.duration_s - (time.perf_counter() - started)))
    await _drain(workers, bounds.timeout_s)


async def _drain(tasks: set[asyncio.Task], timeout_s: float) -> None:
    if not tasks:
        return
    _, still = await asyncio.wait(set(tasks), timeout=timeout_s)
    for task in still:
        task.cancel()
    if still:
        await asyncio.gather(*still, return_exceptions=True)
