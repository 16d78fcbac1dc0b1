"""Stream sessions, the diffusion loop and the image expert actor body, in process (no Ray):
lag and ordering, the filter's savings, queue overflow, energy per frame and its conservation,
session release, text-to-image, and parameter validation."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

from tests.fakes import FakeDevice
from wattserve.errors import InvalidRequest, QueueFull, RequestAborted
from wattserve.images import (
    CfgType,
    FrameResult,
    ImageData,
    ImageFormat,
    ImageJobCall,
    ImageParams,
    ImageStreamCall,
    SimilarityFilterParams,
    StreamSummary,
)
from wattserve.specs import ExpertSpec
from workers.devices import open_device
from workers.diffusion.loop import DiffusionLoop
from workers.diffusion.session import RawResult, RawSummary, StreamSession
from workers.diffusion.settings import resolve_settings
from workers.diffusion.worker import ImageExpertWorker

pytestmark = pytest.mark.timeout(120)

N = 3
ENGINE = {"kind": "diffusion", "threads": 1, "t_index_list": [10, 25, 40], "max_sessions": 3}


def spec(model_dir, device="cpu", **engine) -> ExpertSpec:
    return ExpertSpec(name="img", model={"kind": "local", "path": str(model_dir)},
                      engine={**ENGINE, **engine}, device=device, priority_class="low")


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def raw(px: np.ndarray) -> ImageData:
    return ImageData(px.tobytes(), ImageFormat.RAW_RGB, px.shape[1], px.shape[0], 3)


@pytest.fixture(scope="module")
def worker(tiny_diffusion_dir):
    w = ImageExpertWorker(spec(tiny_diffusion_dir), 0, exit_on_failure=False)
    yield w
    w.shutdown()


# -- a session stepped by hand (deterministic: no loop thread) ----------------------------------


class Manual:
    """A session and the (not started) loop's meter, stepped explicitly."""

    def __init__(self, worker, cfg=CfgType.SELF, similarity=None, in_q=16, out_q=64, fbs=1, stream_batch=True) -> None:
        self.loop = DiffusionLoop(worker.model, open_device(worker.spec.device), worker.engine)
        call = ImageStreamCall("s1", ImageParams("the cat", cfg_type=cfg), similarity=similarity, frame_buffer_size=fbs)
        settings = resolve_settings(call.params, worker.engine, worker.model, similarity=similarity,
                                    frame_buffer_size=fbs, energy_source="modeled:cpu")
        self.session = StreamSession(call, settings, worker.model, input_queue_frames=in_q, output_queue_frames=out_q,
                                     schedule_steps=50, stream_batch=stream_batch)
        self.session.setup(self.loop.meter)

    def step_all(self) -> None:
        while self.session.has_work():
            self.session.step(self.loop.meter)

    def outputs(self) -> list:
        return self.session.output.take(10_000)


def test_output_lags_by_n_minus_one_frames_then_flushes(worker):
    m = Manual(worker)
    assert m.session.settings.output_lag_frames == N - 1
    assert len(m.session.settings.timesteps) == N
    for k in range(6):
        m.session.push(k, pixels(k))
        m.session.step(m.loop.meter)
        out = m.outputs()
        if k < N - 1:
            assert out == [], "warm-up: nothing leaves before the n-th step"
        else:
            assert [r.frame_index for r in out] == [k - N + 1]
            assert out[0].unet_evaluations == N and not out[0].skipped
    m.session.end_input()
    m.step_all()
    out = m.outputs()
    assert [r.frame_index for r in out[:-1]] == [4, 5] and isinstance(out[-1], RawSummary)
    t = out[-1].totals
    assert (t.frames_processed, t.unet_calls, t.unet_evaluations) == (6, 6 + N - 1, 6 * N)
    assert t.setup_energy_j > 0


@pytest.mark.parametrize("cfg", [CfgType.SELF, CfgType.INITIALIZE])
def test_stream_batch_images_equal_sequential_images(worker, cfg):
    """Through VAE encode and decode too: the pipelined stream gives the images that denoising
    each frame on its own (n UNet calls) gives."""
    images, calls = {}, {}
    for batched in (True, False):
        m = Manual(worker, cfg=cfg, stream_batch=batched)
        before = worker.model.counters.calls
        out = {}
        for k in range(5):
            m.session.push(k, pixels(k))
            m.session.step(m.loop.meter)
            left = {r.frame_index: r.pixels for r in m.outputs()}
            assert sorted(left) == ([k - N + 1] if batched and k >= N - 1 else [] if batched else [k])
            out.update(left)
        m.session.end_input()
        m.step_all()
        out.update({r.frame_index: r.pixels for r in m.outputs() if isinstance(r, RawResult)})
        calls[batched] = worker.model.counters.calls - before
        images[batched] = out
    assert calls == {True: 5 + N - 1, False: 5 * N}
    assert sorted(images[True]) == sorted(images[False]) == list(range(5))
    assert not np.array_equal(images[True][0], images[True][1])  # the inputs matter
    for k, px in images[True].items():
        assert np.abs(px.astype(int) - images[False][k]).max() <= 1  # uint8 rounding of float noise


def test_static_clip_skips_frames_and_reports_the_saving(worker):
    m = Manual(worker, similarity=SimilarityFilterParams(True, 0.98, 10))
    same = pixels(42)
    for k in range(25):
        m.session.push(k, same)
        m.session.step(m.loop.meter)
    m.session.end_input()
    m.step_all()
    results = [r for r in m.outputs() if isinstance(r, RawResult)]
    summary = m.session.totals
    # frames 0..2 cannot be skipped (no output to repeat yet), then 10 skips, 1 forced, 10 skips, 1
    assert (summary.frames_processed, summary.frames_skipped) == (5, 20)
    assert sorted(r.frame_index for r in results) == list(range(25))
    processed = [r for r in results if not r.skipped]
    skipped = [r for r in results if r.skipped]
    mean_processed_j = np.mean([r.energy_j for r in processed])
    for r in skipped:
        assert r.unet_evaluations == 0 and r.similarity == pytest.approx(1.0)
        assert r.source_frame_index < r.frame_index
        assert r.energy_j < mean_processed_j / 5
        assert r.energy_saved_j > 0
        source = next(p for p in processed if p.frame_index == r.source_frame_index)
        assert np.array_equal(r.pixels, source.pixels), "a skipped frame repeats the previous output"
    assert summary.energy_saved_j == pytest.approx(sum(r.energy_saved_j for r in skipped))


def test_changing_clip_is_never_skipped(worker):
    m = Manual(worker, similarity=SimilarityFilterParams(True, 0.98, 10))
    for k in range(8):
        m.session.push(k, pixels(100 + k))
        m.session.step(m.loop.meter)
    m.session.end_input()
    m.step_all()
    assert (m.session.totals.frames_processed, m.session.totals.frames_skipped) == (8, 0)


def test_full_input_queue_drops_the_oldest_frames(worker):
    m = Manual(worker, in_q=4)
    for k in range(10):
        m.session.push(k, pixels(k))
    assert m.session.take_dropped() == (0, 1, 2, 3, 4, 5)
    assert m.session.input.dropped == 6 and m.session.totals.frames_received == 10
    m.session.end_input()
    m.step_all()
    answered = [r.frame_index for r in m.outputs() if isinstance(r, RawResult)]
    assert answered == [6, 7, 8, 9]


def test_full_output_queue_drops_the_oldest_results(worker):
    m = Manual(worker, out_q=2)
    for k in range(6):
        m.session.push(k, pixels(k))
        m.session.step(m.loop.meter)
    m.session.end_input()
    m.step_all()
    left = m.outputs()
    assert [r.frame_index for r in left[:-1]] == [5] and isinstance(left[-1], RawSummary)
    assert m.session.output.dropped == 5
    assert m.session.take_dropped() == (0, 1, 2, 3, 4)


def test_frame_buffer_size_denoises_groups_in_one_call(worker):
    m = Manual(worker, fbs=2)
    for k in range(6):
        m.session.push(k, pixels(k))
    calls = worker.model.counters.calls
    sizes_before = len(worker.model.counters.batch_sizes)
    m.session.end_input()
    m.step_all()
    # 3 groups of 2 frames + 2 flush steps; full steps carry 2 frames x 3 timesteps
    assert worker.model.counters.calls - calls == 3 + N - 1
    assert max(worker.model.counters.batch_sizes[sizes_before:]) == 2 * N
    assert sorted(r.frame_index for r in m.outputs() if isinstance(r, RawResult)) == list(range(6))


def test_energy_per_frame_is_conserved(worker):
    m = Manual(worker, cfg=CfgType.FULL)
    for k in range(6):
        m.session.push(k, pixels(k))
    m.session.end_input()
    m.step_all()
    results = [r for r in m.outputs() if isinstance(r, RawResult)]
    assert len(results) == 6 and all(r.energy_j > 0 and r.unet_evaluations == 2 * N for r in results)
    m.loop.meter.idle()
    totals = m.loop.energy()
    assert totals.requests_j + totals.idle_j == pytest.approx(totals.device_j, rel=1e-9)
    assert totals.requests_j == pytest.approx(m.session.totals.energy_j, rel=1e-6)  # frames + setup


@pytest.mark.parametrize("cfg", list(CfgType))
def test_frame_energy_is_its_share_of_each_phase(worker, cfg):
    """1 J per UNet row and per image encoded or decoded: a frame is charged its own rows over
    its n calls plus its encode and decode, whatever else shared the calls."""
    # 1 J per item of described work (UNet rows, images encoded/decoded): attribution checks to the joule
    loop = DiffusionLoop(worker.model, FakeDevice(lambda work: work.batch_size), worker.engine)
    call = ImageStreamCall("fake", ImageParams("the cat", negative_prompt="blurry", cfg_type=cfg))
    settings = resolve_settings(call.params, worker.engine, worker.model)
    session = StreamSession(call, settings, worker.model, input_queue_frames=8, output_queue_frames=64, schedule_steps=50)
    session.setup(loop.meter)
    for k in range(5):
        session.push(k, pixels(k))
        session.step(loop.meter)
    session.end_input()
    while session.has_work():
        session.step(loop.meter)
    results = [r for r in session.output.take(100) if isinstance(r, RawResult)]
    rows = {CfgType.NONE: N, CfgType.SELF: N, CfgType.INITIALIZE: N + 1, CfgType.FULL: 2 * N}[cfg]
    assert [r.energy_j for r in results] == pytest.approx([rows + 2] * 5)  # + encode + decode
    assert session.totals.setup_energy_j == 1.0  # prompt (and negative) encoded in one phase


def test_simulated_gpu_models_each_phase_from_its_flops(worker, tiny_diffusion_dir):
    device = open_device(spec(tiny_diffusion_dir, device="simulated:h100").device, model_params=worker.model.params)
    loop = DiffusionLoop(worker.model, device, worker.engine)
    call = ImageStreamCall("sim", ImageParams("the cat", cfg_type=CfgType.FULL))
    settings = resolve_settings(call.params, worker.engine, worker.model)
    session = StreamSession(call, settings, worker.model, input_queue_frames=8, output_queue_frames=8, schedule_steps=50)
    session.setup(loop.meter)
    for k in range(4):
        session.push(k, pixels(k))
    session.end_input()
    while session.has_work():
        session.step(loop.meter)
    results = [r for r in session.output.take(100) if isinstance(r, RawResult)]
    assert device.energy_source == "modeled:h100"
    assert len(results) == 4 and all(r.energy_j > 0 for r in results)
    assert loop.meter.flops.unet_row(worker.model.latent_shape(16, 16)) > 0


# -- the actor body, with its loop thread ---------------------------------------------------


async def stream(worker, call: ImageStreamCall, frames: list[ImageData], read=True):
    settings = await worker.open_session(call)
    out: list = []

    async def reader():
        async for messages in worker.stream_outputs(call.session_id):
            out.extend(messages)

    task = asyncio.create_task(reader()) if read else None
    for k, f in enumerate(frames):
        await worker.push_frame(call.session_id, k, f)
    await worker.end_input(call.session_id)
    if task:
        await asyncio.wait_for(task, 60)
    return settings, out


async def wait_until(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_worker_streams_png_results_and_a_summary(worker):
    frames = [raw(pixels(k)) for k in range(5)]
    call = ImageStreamCall("w1", ImageParams("the cat", output_format=ImageFormat.PNG))
    settings, out = await stream(worker, call, frames)
    assert settings.cfg_type is CfgType.SELF and settings.unet_evaluations_per_frame == N
    results = [m for m in out if isinstance(m, FrameResult)]
    assert [r.frame_index for r in results] == list(range(5))
    for r in results:
        assert Image.open(io.BytesIO(r.image.data)).size == (16, 16)
        assert r.energy_source == "modeled:cpu" and r.energy_j > 0 and r.expert_latency_ms > 0
    summary = out[-1]
    assert isinstance(summary, StreamSummary) and summary.frames_processed == 5
    assert summary.energy_j == pytest.approx(sum(r.energy_j for r in results) + summary.setup_energy_j)
    assert await wait_until(lambda: _sessions(worker, 0))


async def _sessions(worker, n):
    return (await worker.stats()).sessions_open == n


async def test_closing_a_session_releases_it(worker):
    call = ImageStreamCall("w2", ImageParams("the cat"))
    await worker.open_session(call)
    assert (await worker.stats()).sessions_open == 1
    await worker.push_frame("w2", 0, raw(pixels(0)))
    await worker.close_session("w2")
    assert await wait_until(lambda: _sessions(worker, 0))
    with pytest.raises(RequestAborted):
        await worker.push_frame("w2", 1, raw(pixels(1)))


async def test_cancelled_reader_releases_the_session(worker):
    call = ImageStreamCall("w3", ImageParams("the cat"))
    await worker.open_session(call)
    gen = worker.stream_outputs("w3")
    reader = asyncio.create_task(gen.__anext__())
    await worker.push_frame("w3", 0, raw(pixels(0)))
    await asyncio.sleep(0.1)
    reader.cancel()  # what Ray does to the generator when the gateway cancels the stream
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await wait_until(lambda: _sessions(worker, 0))


async def test_bad_frames_and_protocol_errors(worker):
    call = ImageStreamCall("w4", ImageParams("the cat"))
    await worker.open_session(call)
    with pytest.raises(InvalidRequest, match="takes 16x16"):
        await worker.push_frame("w4", 0, raw(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(InvalidRequest, match="not a readable PNG"):
        await worker.push_frame("w4", 0, ImageData(b"garbage", ImageFormat.PNG))
    await worker.end_input("w4")
    with pytest.raises(InvalidRequest, match="after the end of the input"):
        await worker.push_frame("w4", 1, raw(pixels(1)))
    await worker.close_session("w4")
    with pytest.raises(RequestAborted, match="not open"):
        await worker.push_frame("nope", 0, raw(pixels(0)))


async def test_max_sessions(worker):
    calls = [ImageStreamCall(f"m{i}", ImageParams("the cat")) for i in range(3)]
    for c in calls:
        await worker.open_session(c)
    with pytest.raises(QueueFull, match="max_sessions 3"):
        await worker.open_session(ImageStreamCall("m3", ImageParams("the cat")))
    for c in calls:
        await worker.close_session(c.session_id)
    assert await wait_until(lambda: _sessions(worker, 0))


async def test_idle_session_is_closed(tiny_diffusion_dir):
    w = ImageExpertWorker(spec(tiny_diffusion_dir, session_idle_timeout_s=0.2), 0, exit_on_failure=False)
    try:
        await w.open_session(ImageStreamCall("idle", ImageParams("the cat")))
        assert await wait_until(lambda: _sessions(w, 0), 5)
    finally:
        w.shutdown()


async def test_generate_image(worker):
    for cfg in (CfgType.NONE, CfgType.INITIALIZE, CfgType.FULL):
        res = await worker.generate_image(ImageJobCall(f"g-{cfg}", ImageParams("the cat", cfg_type=cfg, width=16, height=12,
                                                                               output_format=ImageFormat.JPEG)))
        assert Image.open(io.BytesIO(res.image.data)).format == "JPEG"
        assert (res.image.width, res.image.height) == (16, 12)
        assert res.unet_calls == N
        assert res.unet_evaluations == {CfgType.NONE: N, CfgType.INITIALIZE: N + 1, CfgType.FULL: 2 * N}[cfg]
        assert res.energy_j > 0 and res.energy_source == "modeled:cpu"
    stats = await worker.stats()
    assert stats.images_generated >= 3 and stats.evaluations_by_cfg["full"] >= 2 * N
    profile = await worker.profile()
    assert profile.engine == "diffusion" and profile.priority_class == "low" and profile.image is not None
    assert profile.energy.requests_j > 0 and profile.healthy


@pytest.mark.parametrize(
    ("params", "extra", "message"),
    [
        (ImageParams(""), {}, "prompt is empty"),
        (ImageParams("the cat " * 20), {}, "at most 16"),
        (ImageParams("x", t_index_list=(20, 10)), {}, "strictly increasing"),
        (ImageParams("x", t_index_list=(10, 50)), {}, "strictly increasing"),
        (ImageParams("x", width=18), {}, "multiple of 4"),
        (ImageParams("x", width=2048, height=2048), {}, "at most"),
        (ImageParams("x", guidance_scale=0.5), {}, "guidance_scale"),
        (ImageParams("x", guidance_scale=float("nan")), {}, "guidance_scale"),
        (ImageParams("x", delta=-1.0), {}, "delta"),
        (ImageParams("x", jpeg_quality=100), {}, "jpeg_quality"),
        (ImageParams("x"), {"frame_buffer_size": 9}, "frame_buffer_size"),
        (ImageParams("x"), {"similarity": SimilarityFilterParams(True, 1.5)}, "threshold"),
    ],
)
def test_invalid_parameters(worker, params, extra, message):
    with pytest.raises(InvalidRequest, match=message):
        resolve_settings(params, worker.engine, worker.model, **extra)


def test_guidance_scale_one_means_no_guidance(worker):
    s = resolve_settings(ImageParams("x", cfg_type=CfgType.FULL, guidance_scale=1.0), worker.engine, worker.model)
    assert s.cfg_type is CfgType.NONE and s.unet_evaluations_per_frame == N


@pytest.mark.gpu
async def test_cuda_stream_with_measured_energy(request):
    """On a GPU host: float16 on CUDA, energy from the NVML counter."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tiny_diffusion_dir = request.getfixturevalue("tiny_diffusion_dir")
    gpu_spec = ExpertSpec(name="img", model={"kind": "local", "path": str(tiny_diffusion_dir)},
                          engine={**ENGINE, "device": "cuda", "dtype": "float16"}, device="nvml")
    w = ImageExpertWorker(gpu_spec, 0, exit_on_failure=False)
    try:
        settings, out = await stream(w, ImageStreamCall("gpu", ImageParams("the cat")), [raw(pixels(k)) for k in range(6)])
        results = [m for m in out if isinstance(m, FrameResult)]
        assert [r.frame_index for r in results] == list(range(6))
        assert all(r.energy_source.startswith("measured:nvml") and r.energy_j >= 0 for r in results)
        assert settings.energy_source.startswith("measured:nvml")
    finally:
        w.shutdown()


def test_skipped_steps_still_advance_the_frames_in_flight(worker):
    m = Manual(worker, similarity=SimilarityFilterParams(True, 0.98, 10))
    same = pixels(5)
    for k in range(N):  # nothing has left yet, so these are processed whatever their similarity
        m.session.push(k, same)
        m.session.step(m.loop.meter)
    assert [(r.frame_index, r.skipped) for r in m.outputs()] == [(0, False)]
    calls = worker.model.counters.calls
    for k in range(N, N + 4):
        m.session.push(k, same)
        m.session.step(m.loop.meter)
    out = [(r.frame_index, r.skipped, r.source_frame_index) for r in m.outputs()]
    # each skip is answered with the last image out; the in-flight frames 1, 2 drain meanwhile
    assert out == [(3, True, 0), (1, False, 1), (4, True, 1), (2, False, 2), (5, True, 2), (6, True, 2)]
    assert worker.model.counters.calls - calls == N - 1  # draining; then skips cost no UNet call
