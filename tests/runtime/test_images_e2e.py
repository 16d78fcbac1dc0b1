"""Image experts end to end on loopback: real Ray actors (a tiny random diffusion model beside a
tiny LLM), the real gRPC server, bidirectional StreamImages and unary GenerateImage over a real
channel; errors, cancellation, routing by modality and metrics."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import generate_latest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.config import parse_config
from tests.runtime.grpc_helpers import wait_for

pytestmark = pytest.mark.timeout(300)

N = 2  # denoising steps of the image expert's default t_index_list


@pytest.fixture(scope="module")
def config(tiny_model_dirs, tiny_diffusion_dir, tmp_path_factory):
    return parse_config(
        {
            "auth": {"enabled": False},  # loopback test server: no keys
            "gateway": {"port": 0, "max_inflight": 16, "health_interval_s": 0.2},
            "http": {"enabled": False},
            "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
            "experts": [
                {"name": "edge", "model": {"kind": "local", "path": str(tiny_model_dirs["llama"])},
                 "engine": {"kind": "torch", "threads": 1}, "max_batch": 4, "max_model_len": 512},
                {"name": "img", "model": {"kind": "local", "path": str(tiny_diffusion_dir)},
                 "engine": {"kind": "diffusion", "threads": 1, "t_index_list": [20, 40], "max_sessions": 2,
                            "input_queue_frames": 16},
                 "device": "cpu", "priority_class": "low"},
            ],
        },
        "test-config",
    )


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield pb_grpc.InferenceStub(ch)


def raw_frame(seed: int, w: int = 16, h: int = 16) -> pb.Image:
    px = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return pb.Image(data=px.tobytes(), format=pb.IMAGE_FORMAT_RAW_RGB, width=w, height=h)


def png_frame(seed: int, mode: str = "RGB") -> pb.Image:
    px = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).convert(mode).save(buf, format="PNG")
    return pb.Image(data=buf.getvalue(), format=pb.IMAGE_FORMAT_PNG)


def config_msg(**kw) -> pb.StreamImagesRequest:
    params = pb.ImageParams(prompt=kw.pop("prompt", "the cat"), **kw.pop("params", {}))
    return pb.StreamImagesRequest(config=pb.ImageStreamConfig(params=params, **kw))


async def requests(first, frames, delay_s: float = 0.0):
    yield first
    for f in frames:
        if delay_s:
            await asyncio.sleep(delay_s)
        yield pb.StreamImagesRequest(frame=f)


async def collect(call):
    started, frames, summary = None, [], None
    async for msg in call:
        kind = msg.WhichOneof("kind")
        if kind == "started":
            assert started is None and not frames
            started = msg.started
        elif kind == "frame":
            assert summary is None
            frames.append(msg.frame)
        else:
            summary = msg.summary
    return started, frames, summary


async def image_stats(server):
    return await server.pool.replicas["img"][0].actor.stats.remote()


async def test_stream_images_frames_in_results_out(stub):
    frames = [raw_frame(k) for k in range(5)]
    call = stub.StreamImages(requests(config_msg(params={"output_format": pb.IMAGE_FORMAT_PNG}), frames, 0.02),
                             timeout=120)
    started, results, summary = await collect(call)
    assert started.expert == "img" and started.cfg_type == pb.CFG_TYPE_SELF
    assert list(started.t_index_list) == [20, 40] and len(started.timesteps) == N
    assert started.unet_evaluations_per_frame == N and started.output_lag_frames == N - 1
    assert started.energy_source == "modeled:cpu" and started.setup_energy_j > 0
    assert started.routing_policy == "least_loaded"
    assert [r.frame_index for r in results] == list(range(5))
    for r in results:
        assert not r.skipped and r.source_frame_index == r.frame_index
        assert Image.open(io.BytesIO(r.image.data)).size == (16, 16)
        assert r.energy_j > 0 and r.energy_source == "modeled:cpu"
        assert r.latency_ms > 0 and r.expert_latency_ms > 0 and r.unet_evaluations == N
    assert summary.frames_received == summary.frames_processed == 5
    assert summary.unet_evaluations == 5 * N and summary.unet_calls == 5 + N - 1
    assert summary.energy_j == pytest.approx(sum(r.energy_j for r in results) + summary.setup_energy_j, rel=1e-6)


async def test_static_clip_with_the_filter_skips_and_saves(stub):
    same = raw_frame(7)
    cfg = config_msg(similarity_filter=pb.SimilarityFilter(enabled=True, max_skip_frames=4),
                     params={"output_format": pb.IMAGE_FORMAT_RAW_RGB, "cfg_type": pb.CFG_TYPE_FULL})
    started, results, summary = await collect(stub.StreamImages(requests(cfg, [same] * 14, 0.01), timeout=120))
    assert started.unet_evaluations_per_frame == 2 * N and started.similarity_filter.enabled
    assert summary.frames_skipped > 0 and summary.frames_processed + summary.frames_skipped == 14
    skipped = [r for r in results if r.skipped]
    processed = [r for r in results if not r.skipped]
    assert len(skipped) == summary.frames_skipped and sorted(r.frame_index for r in results) == list(range(14))
    assert max(r.energy_j for r in skipped) < min(r.energy_j for r in processed)
    assert summary.energy_saved_j > 0 and all(r.energy_saved_j > 0 for r in skipped)
    assert all(r.similarity == pytest.approx(1.0) and r.unet_evaluations == 0 for r in skipped)
    for r in results:  # raw RGB out with its shape
        assert (r.image.width, r.image.height, len(r.image.data)) == (16, 16, 16 * 16 * 3)


async def test_generate_image(stub):
    resp = await stub.GenerateImage(pb.GenerateImageRequest(
        params=pb.ImageParams(prompt="the cat", width=16, height=8, cfg_type=pb.CFG_TYPE_INITIALIZE,
                              output_format=pb.IMAGE_FORMAT_JPEG), request_id="mine"), timeout=60)
    assert resp.expert == "img" and resp.request_id == "mine"
    assert Image.open(io.BytesIO(resp.image.data)).size == (16, 8)
    assert (resp.unet_calls, resp.unet_evaluations) == (N, N + 1)
    assert resp.energy_j > 0 and resp.energy_source == "modeled:cpu" and resp.latency_ms >= resp.expert_latency_ms


@pytest.mark.parametrize(
    ("messages", "detail"),
    [
        ([pb.StreamImagesRequest(frame=raw_frame(0))], "first StreamImages message must be `config`"),
        ([config_msg(params={"t_index_list": [40, 20]})], "strictly increasing"),
        ([config_msg(prompt="")], "prompt is empty"),
        ([config_msg(params={"width": 18})], "multiple of 4"),
        ([config_msg(expert="edge")], "serves text"),
        ([config_msg(params={"cfg_type": 9})], "cfg_type 9"),
        ([config_msg(), pb.StreamImagesRequest(frame=raw_frame(0, 8, 8))], "takes 16x16"),
        ([config_msg(), pb.StreamImagesRequest(frame=pb.Image(data=b"\x00" * 100, format=pb.IMAGE_FORMAT_RAW_RGB,
                                                              width=16, height=16))], "needs 768 bytes"),
        ([config_msg(), pb.StreamImagesRequest(frame=pb.Image(data=b"\x00" * 1024, format=pb.IMAGE_FORMAT_RAW_RGB,
                                                              width=16, height=16, channels=4))], "3 channels"),
        ([config_msg(), pb.StreamImagesRequest(frame=png_frame(0, "RGBA"))], "4 channel"),
        ([config_msg(), pb.StreamImagesRequest(frame=pb.Image(data=b"\x89PNG garbage", format=pb.IMAGE_FORMAT_PNG))],
         "not a readable PNG"),
        ([config_msg(), config_msg()], "send the config once"),
    ],
)
async def test_bad_streams_are_invalid_argument(stub, server, messages, detail):
    async def gen():
        for m in messages:
            yield m
        await asyncio.sleep(30)  # keep the stream open: the error must come from the server

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.StreamImages(gen(), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in err.value.details()
    assert await wait_for(lambda: _no_sessions(server)), "a failed stream releases its session"


async def _no_sessions(server):
    return (await image_stats(server)).sessions_open == 0 and server.gateway.inflight == 0


async def test_cancelled_stream_releases_the_actor(stub, server):
    sent = asyncio.Event()

    async def gen():
        yield config_msg()
        for k in range(3):
            yield pb.StreamImagesRequest(frame=raw_frame(k))
        sent.set()
        await asyncio.sleep(60)  # the client keeps the stream open, then goes away

    call = stub.StreamImages(gen(), timeout=120)
    first = await call.read()
    assert first.WhichOneof("kind") == "started"
    await sent.wait()
    assert (await image_stats(server)).sessions_open == 1
    call.cancel()
    assert await wait_for(lambda: _no_sessions(server)), "the actor's session must be released"


async def test_max_sessions_then_resource_exhausted(stub, server):
    async def hold():
        yield config_msg()
        await asyncio.sleep(60)

    calls = [stub.StreamImages(hold(), timeout=120) for _ in range(2)]
    for c in calls:
        assert (await c.read()).WhichOneof("kind") == "started"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.StreamImages(hold(), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions 2" in err.value.details()
    assert "retry-after-ms" in dict(err.value.trailing_metadata())
    for c in calls:
        c.cancel()
    assert await wait_for(lambda: _no_sessions(server))


async def test_text_and_image_requests_reach_only_their_experts(stub, server):
    for _ in range(6):  # the router never picks the image expert for text
        usage = None
        async for msg in stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2), timeout=60):
            usage = msg.usage if msg.HasField("usage") else usage
        assert usage.expert == "edge"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, expert="img"), timeout=60):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "serves images" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GenerateImage(pb.GenerateImageRequest(params=pb.ImageParams(prompt="x"), expert="edge"), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "serves text" in err.value.details()


async def test_admin_and_metrics_show_the_image_expert(server, stub):
    # This test's own stream (cfg "self", the filter on a static clip), so it passes alone too.
    same = raw_frame(3)
    cfg = config_msg(similarity_filter=pb.SimilarityFilter(enabled=True, max_skip_frames=4),
                     params={"output_format": pb.IMAGE_FORMAT_RAW_RGB})
    _, _, summary = await collect(stub.StreamImages(requests(cfg, [same] * 8, 0.01), timeout=120))
    assert summary.frames_skipped > 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        experts = await pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest())
    img = next(e for e in experts.experts if e.name == "img")
    assert img.engine == "diffusion" and img.priority_class == "low" and img.replicas[0].healthy
    assert img.replicas[0].requests_energy_j > 0 and img.replicas[0].energy_source == "modeled:cpu"
    text = generate_latest(server.metrics.registry).decode()
    assert 'wattserve_image_frames_total{expert="img",outcome="processed"}' in text
    assert 'wattserve_image_unet_evaluations_total{cfg_type="self",expert="img"}' in text
    assert 'wattserve_image_requests_total{expert="img",kind="stream",status="ok"}' in text
    assert 'wattserve_image_energy_saved_joules_total{expert="img"}' in text


async def test_cli_image_and_stream_images(server, tmp_path):
    """The client commands against the running server (a thread: the server shares this loop)."""
    from runtime.cli import main

    target = f"127.0.0.1:{server.port}"
    out = tmp_path / "cat.png"
    rc = await asyncio.to_thread(main, ["image", "the cat", "--out", str(out), "--target", target, "--cfg-type", "full"])
    assert rc == 0 and Image.open(out).size == (16, 16)
    frames, results = tmp_path / "frames", tmp_path / "results"
    frames.mkdir()
    for k in range(4):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(frames / f"{k:03d}.png")
    rc = await asyncio.to_thread(main, ["stream-images", "the cat", "--frames", str(frames), "--out", str(results),
                                        "--target", target, "--format", "jpeg"])
    assert rc == 0 and sorted(p.name for p in results.iterdir()) == [f"{k:06d}.jpg" for k in range(4)]
    rc = await asyncio.to_thread(main, ["image", "the cat", "--out", str(out), "--target", target, "--width", "18"])
    assert rc == 1  # INVALID_ARGUMENT, printed
