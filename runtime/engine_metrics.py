"""Engines' own Prometheus metrics (vLLM's ``vllm:*``), re-exported on the gateway's ``/metrics``.

vLLM's Prometheus logger records into the default registry of the process that runs the engine's
front end: the expert's Ray actor. At every scrape the HTTP server asks each vLLM replica for its
metrics in text format (``ExpertWorker.engine_metrics``), adds ``expert`` and ``replica`` labels so
replicas stay apart, merges families of the same name and appends them to wattserve's own series.
One scrape target therefore shows both; a replica that does not answer within the timeout is left
out of that scrape (its ``wattserve_replica_healthy`` says why).
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

#: engines whose replicas export metrics of their own
ENGINES_WITH_METRICS = ("vllm",)


async def engine_metrics_text(admin, timeout_s: float = 2.0) -> bytes:
    """Prometheus text of every vLLM replica's ``vllm:*`` metrics, labelled by expert and replica
    (``admin``: the gateway's :class:`~runtime.gateway.admin.Admin`)."""
    clients = admin.clients(ENGINES_WITH_METRICS)
    if not clients:
        return b""
    answers = await asyncio.gather(
        *(asyncio.wait_for(c.engine_metrics(), timeout_s) for c in clients), return_exceptions=True
    )
    texts = {}
    for client, answer in zip(clients, answers, strict=True):
        if isinstance(answer, str):
            texts[(client.expert, str(client.index))] = answer
        else:
            log.debug("no engine metrics from %s: %r", client.name, answer)
    return merge_metrics(texts)



def merge_metrics(texts: dict[tuple[str, str], str]) -> bytes:
    """Merge several processes' Prometheus texts into one, adding ``expert`` and ``replica``
    labels to every sample. Families with the same name are joined (their help and type come
    from the first replica that has them)."""
    families: dict[str, Metric] = {}
    for (expert, replica), text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "expert": expert, "replica": replica}))
    return generate_latest(_Families(list(families.values()))) if families else b""


class _Families:
    """A registry stand-in for ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)
