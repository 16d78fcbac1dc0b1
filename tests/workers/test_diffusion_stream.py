"""Stream Batch and residual CFG on a tiny random latent diffusion model loaded through the real
loading code: equivalence with sequential denoising, one UNet call per step, evaluation counts,
and the guidance formulas."""

from __future__ import annotations

import pytest
import torch

from wattserve.errors import InvalidRequest, ModelSourceError
from wattserve.images import CfgType, unet_evaluations_per_frame
from wattserve.specs import DiffusionEngineSpec
from workers.diffusion.components import DiffusionModel, check_diffusers_dir
from workers.diffusion.schedule import LcmSchedule
from workers.diffusion.stream import Guidance, StreamBatch, make_noise

T_INDEX = (10, 25, 40)
N = len(T_INDEX)
SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def model(tiny_diffusion_dir) -> DiffusionModel:
    return DiffusionModel(tiny_diffusion_dir, DiffusionEngineSpec(threads=1))


@pytest.fixture(scope="module")
def schedule(model) -> LcmSchedule:
    return LcmSchedule(model.scheduler, T_INDEX, 50, model.prediction_type, model.device, model.dtype)


@pytest.fixture(scope="module")
def embeddings(model):
    return model.encode_prompt("the cat"), model.encode_prompt("blurry")


class RecordingUNet:
    """The real UNet, recording each call's batch size and timesteps."""

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, latents, timesteps, embeddings):
        self.calls.append((int(latents.shape[0]), tuple(int(t) for t in timesteps)))
        return self.model.unet(latents, timesteps, embeddings)


def input_latents(count: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen) for _ in range(count)]


def make_batch(model, schedule, embeddings, cfg: CfgType, group: int = 1, seed: int = 7, unet=None):
    cond, uncond = embeddings
    noise = make_noise(N, group, SHAPE, seed, model.device, model.dtype)
    guidance = Guidance(cfg, guidance_scale=1.5, delta=0.8)
    return StreamBatch(unet or model.unet, schedule, guidance, noise, cond, uncond)


def run_stream(batch: StreamBatch, frames: list[torch.Tensor], group: int = 1):
    """Feed frames ``group`` at a time, one step per group, then flush; returns
    {key: (output latent, step number it left at)}."""
    out, step_no = {}, 0
    for start in range(0, len(frames), group):
        batch.admit([(start + p, frames[start + p]) for p in range(min(group, len(frames) - start))])
        for key, latent, _ in batch.step():
            out[key] = (latent, step_no)
        step_no += 1
    while batch.in_flight():
        for key, latent, _ in batch.step():
            out[key] = (latent, step_no)
        step_no += 1
    return out


def run_sequential(model, schedule, embeddings, cfg, frame: torch.Tensor, position: int, group: int):
    """Denoise one frame alone: admit, then n steps of a one-slot batch with the same noise."""
    cond, uncond = embeddings
    noise = make_noise(N, group, SHAPE, 7, model.device, model.dtype)[:, position:position + 1]
    batch = StreamBatch(model.unet, schedule, Guidance(cfg, 1.5, 0.8), noise, cond, uncond)
    batch.admit([("only", frame)])
    finished = []
    while batch.in_flight():
        finished = batch.step()
    assert batch.calls == N
    return finished[0][1]


def test_schedule_matches_diffusers_lcm_scheduler(model, schedule):
    """Our batched consistency update equals diffusers' LCMScheduler.step(...).denoised."""
    from diffusers import LCMScheduler

    ref = LCMScheduler.from_config(model.scheduler.config)
    ref.set_timesteps(50)
    assert schedule.timesteps == tuple(int(ref.timesteps[i]) for i in T_INDEX)
    assert schedule.timesteps[0] > schedule.timesteps[-1]  # noisiest first
    gen = torch.Generator().manual_seed(3)
    x, eps = torch.randn((N, *SHAPE), generator=gen), torch.randn((N, *SHAPE), generator=gen)
    ours = schedule.denoise(x, eps, torch.arange(N))
    for i, t in enumerate(schedule.timesteps):
        ref._step_index = None  # step() looks the timestep up again
        theirs = ref.step(eps[i:i + 1], t, x[i:i + 1]).denoised
        torch.testing.assert_close(ours[i:i + 1], theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", list(CfgType))
def test_stream_batch_output_equals_sequential_denoising(model, schedule, embeddings, cfg):
    frames = input_latents(6)
    stream = run_stream(make_batch(model, schedule, embeddings, cfg), frames)
    assert sorted(stream) == list(range(6))
    for k, frame in enumerate(frames):
        latent, left_at = stream[k]
        assert left_at == k + N - 1, "a frame leaves with the n-th step that carries it"
        expected = run_sequential(model, schedule, embeddings, cfg, frame, 0, 1)
        torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [CfgType.SELF, CfgType.FULL])
def test_frame_buffer_size_two_matches_sequential_per_position(model, schedule, embeddings, cfg):
    frames = input_latents(5, seed=2)  # an odd count: the last group is partial
    stream = run_stream(make_batch(model, schedule, embeddings, cfg, group=2), frames, group=2)
    for k, frame in enumerate(frames):
        latent, left_at = stream[k]
        assert left_at == k // 2 + N - 1
        expected = run_sequential(model, schedule, embeddings, cfg, frame, k % 2, 2)
        torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", list(CfgType))
def test_one_unet_call_per_frame_carrying_every_slot(model, schedule, embeddings, cfg):
    unet = RecordingUNet(model)
    batch = make_batch(model, schedule, embeddings, cfg, unet=unet)
    frames = input_latents(8)
    per_frame = unet_evaluations_per_frame(cfg, N)
    rows_after_warmup = {CfgType.NONE: N, CfgType.SELF: N, CfgType.INITIALIZE: N + 1, CfgType.FULL: 2 * N}[cfg]
    for k, frame in enumerate(frames):
        batch.admit([(k, frame)])
        calls_before = len(unet.calls)
        finished = batch.step()
        assert len(unet.calls) == calls_before + 1, "exactly one UNet call per frame"
        rows, timesteps = unet.calls[-1]
        if k >= N - 1:  # warmed up: n latents, one per timestep
            assert rows == rows_after_warmup
            assert sorted(set(timesteps)) == sorted(schedule.timesteps)
            assert [key for key, _, _ in finished] == [k - N + 1]
            assert finished[0][2] == per_frame
        else:
            assert finished == []
    while batch.in_flight():
        batch.step()
    assert batch.evaluations == per_frame * len(frames), "evaluations per frame: n, n, n+1, 2n"
    assert batch.calls == len(frames) + N - 1  # + the flush


def test_evaluations_per_frame_table():
    assert [unet_evaluations_per_frame(c, 4) for c in CfgType] == [4, 4, 5, 8]


class FakeUNet:
    """Predicts a constant noise: ``cond_value`` for prompt rows, ``uncond_value`` for negative
    rows (told apart by their embedding), so each guidance formula can be checked exactly."""

    def __init__(self, cond, cond_value=0.3, uncond_value=-0.2) -> None:
        self.cond, self.cond_value, self.uncond_value = cond, cond_value, uncond_value

    def __call__(self, latents, timesteps, embeddings):
        is_cond = (embeddings == self.cond).flatten(1).all(dim=1).view(-1, 1, 1, 1)
        return torch.where(is_cond, self.cond_value, self.uncond_value).expand_as(latents).clone()


@pytest.mark.parametrize("cfg", list(CfgType))
def test_guidance_formulas(model, schedule, embeddings, cfg):
    cond, uncond = embeddings
    gamma, delta = 1.5, 0.8
    noise = make_noise(N, 1, SHAPE, 7, model.device, model.dtype)
    batch = StreamBatch(FakeUNet(cond), schedule, Guidance(cfg, gamma, delta), noise, cond, uncond)
    x_in = input_latents(1)[0]
    batch.admit([(0, x_in)])
    x = schedule.noise_to(x_in[None], noise[0, :1], torch.tensor([0]))
    x0_neg = None
    for i in range(N):
        steps = torch.tensor([i])
        eps_c = torch.full_like(x, 0.3)
        if cfg is CfgType.NONE:
            eps = eps_c
        elif cfg is CfgType.FULL:
            eps = -0.2 + gamma * (eps_c + 0.2)
        else:
            if cfg is CfgType.INITIALIZE and i == 0:
                eps_u = torch.full_like(x, -0.2 * delta)
                x0_neg = (x - schedule.coef("sqrt_beta", steps) * -0.2) / schedule.coef("sqrt_alpha", steps)
            else:
                ref = x0_neg if cfg is CfgType.INITIALIZE else x_in[None]
                eps_u = delta * schedule.residual_noise(x, ref, steps)
                if cfg is CfgType.SELF and i == 0:  # the residual at the first step is the added noise
                    torch.testing.assert_close(eps_u, delta * noise[0, :1], rtol=1e-4, atol=1e-5)
            eps = eps_u + gamma * (eps_c - eps_u)
        d = schedule.denoise(x, eps, steps)
        out = batch.step()
        if i < N - 1:
            x = schedule.noise_to(d, noise[i + 1, :1], torch.tensor([i + 1]))
            torch.testing.assert_close(batch.slots[0].latent[None], x, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(out[0][1][None], d, rtol=1e-5, atol=1e-5)


def test_text_to_image_starts_from_pure_noise(model, schedule, embeddings):
    batch = make_batch(model, schedule, embeddings, CfgType.SELF)
    batch.admit([("t2i", None)])
    torch.testing.assert_close(batch.slots[0].latent, batch.noise[0, 0])
    assert float(batch.slots[0].reference.abs().sum()) == 0.0


def test_needs_negative_embeddings_for_full_and_initialize(model, schedule, embeddings):
    noise = make_noise(N, 1, SHAPE, 0, model.device, model.dtype)
    with pytest.raises(ValueError, match="negative"):
        StreamBatch(model.unet, schedule, Guidance(CfgType.FULL), noise, embeddings[0], None)


def test_schedule_rejects_bad_t_index_list(model):
    for bad in ([], [5, 5], [30, 10], [0, 50]):
        with pytest.raises(InvalidRequest, match="t_index_list"):
            LcmSchedule(model.scheduler, bad, 50, "epsilon", model.device, model.dtype)


def test_v_prediction_converts_to_noise(model):
    sched = LcmSchedule(model.scheduler, T_INDEX, 50, "v_prediction", model.device, model.dtype)
    gen = torch.Generator().manual_seed(5)
    x0, eps = torch.randn((N, *SHAPE), generator=gen), torch.randn((N, *SHAPE), generator=gen)
    steps = torch.arange(N)
    a, b = sched.coef("sqrt_alpha", steps), sched.coef("sqrt_beta", steps)
    x = a * x0 + b * eps
    v = a * eps - b * x0  # the v-parameterisation
    torch.testing.assert_close(sched.to_epsilon(v, x, steps), eps, rtol=1e-4, atol=1e-4)


def test_loading_checks_the_directory(tmp_path, tiny_diffusion_dir):
    with pytest.raises(ModelSourceError, match="does not exist"):
        check_diffusers_dir(tmp_path / "nope")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelSourceError, match="missing vae, text_encoder, tokenizer, unet/config.json"):
        check_diffusers_dir(tmp_path)
    assert check_diffusers_dir(tiny_diffusion_dir) == tiny_diffusion_dir


def test_loaded_model_facts(model):
    assert (model.default_width, model.default_height) == (16, 16)
    assert model.vae_scale_factor == 2 and model.size_multiple == 4
    assert model.latent_shape(16, 12) == (4, 6, 8)
    assert model.params > 0 and model.max_prompt_tokens == 16
    with pytest.raises(InvalidRequest, match="at most 16"):
        model.tokenize("a very long prompt that has many more than sixteen byte level tokens in it")
