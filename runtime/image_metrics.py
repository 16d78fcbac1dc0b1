"""Prometheus series of the image experts, recorded by :mod:`runtime.gateway.images` as results
pass through the gateway and exported on ``/metrics`` with the rest (same registry).

- ``wattserve_image_requests_total{kind, expert, status}``: streams and text-to-image requests
  by outcome (``ok`` or a gRPC code name in lower case);
- ``wattserve_image_frames_total{expert, outcome}``: frames processed, skipped by the
  similarity filter, or dropped (input queue full / output queue full);
- ``wattserve_image_unet_evaluations_total{expert, cfg_type}``: UNet batch rows, so
  evaluations per frame (n, n, n+1, 2n) can be read off per guidance type;
- ``wattserve_image_energy_joules_total{expert, energy_source, part}``: frames, stream set-up
  and text-to-image energy; ``wattserve_image_energy_saved_joules_total{expert}`` the estimate of
  what skipped frames would have cost;
- ``wattserve_image_frame_latency_seconds{expert}``: frame received -> result sent.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from wattserve.images import FrameResult, ImageResult

from .metrics import status_label

FRAME_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ImageMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(
            "wattserve_image_requests", "Image streams (kind=stream) and text-to-image requests (kind=image) by outcome.",
            ["kind", "expert", "status"], registry=r,
        )
        self.frames = Counter(
            "wattserve_image_frames", "Stream frames by outcome: processed, skipped (similarity filter), "
            "dropped_input (input queue full), dropped_output (output queue full).", ["expert", "outcome"], registry=r,
        )
        self.unet_evaluations = Counter(
            "wattserve_image_unet_evaluations", "UNet evaluations (batch rows) by guidance type.",
            ["expert", "cfg_type"], registry=r,
        )
        self.energy = Counter(
            "wattserve_image_energy_joules", "Energy of image work by part (frame, setup, image); "
            "energy_source says measured:... or modeled:...", ["expert", "energy_source", "part"], registry=r,
        )
        self.energy_saved = Counter(
            "wattserve_image_energy_saved_joules", "Estimated energy that frames skipped by the similarity filter "
            "would have cost (recent processed-frame average).", ["expert"], registry=r,
        )
        self.frame_latency = Histogram(
            "wattserve_image_frame_latency_seconds", "Gateway: frame received -> its result sent.",
            ["expert"], buckets=FRAME_LATENCY_BUCKETS_S, registry=r,
        )

    def request(self, kind: str, expert: str, exc: BaseException | None) -> None:
        self.requests.labels(kind, expert, "ok" if exc is None else status_label(exc)).inc()

    def started(self, expert: str, energy_source: str, setup_energy_j: float) -> None:
        self.energy.labels(expert, energy_source, "setup").inc(setup_energy_j)

    def frame(self, expert: str, result: FrameResult, cfg_type: str, latency_ms: float) -> None:
        self.frames.labels(expert, "skipped" if result.skipped else "processed").inc()
        self.frame_latency.labels(expert).observe(latency_ms / 1000.0)
        if result.unet_evaluations:
            self.unet_evaluations.labels(expert, cfg_type).inc(result.unet_evaluations)
        self.energy.labels(expert, result.energy_source, "frame").inc(result.energy_j)
        if result.energy_saved_j:
            self.energy_saved.labels(expert).inc(result.energy_saved_j)

    def dropped(self, expert: str, input_frames: int, output_frames: int) -> None:
        """A stream ended having dropped these many frames (its last reported totals)."""
        self.frames.labels(expert, "dropped_input").inc(input_frames)
        self.frames.labels(expert, "dropped_output").inc(output_frames)

    def image(self, expert: str, result: ImageResult) -> None:
        cfg = result.settings.cfg_type.value if result.settings else "unknown"
        self.unet_evaluations.labels(expert, cfg).inc(result.unet_evaluations)
        self.energy.labels(expert, result.energy_source, "image").inc(result.energy_j)
