"""The stochastic similarity filter, the drop-oldest queues and the image codec: pure parts of
the image expert, tested with plain values."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from wattserve.errors import InvalidRequest
from wattserve.images import ImageData, ImageFormat
from workers.diffusion.images import decode_image, encode_image
from workers.diffusion.queues import DropOldestQueue
from workers.diffusion.similarity import SimilarityFilter

FRAME = (3, 16, 16)


def frame(seed: int) -> torch.Tensor:
    return torch.rand(FRAME, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def with_similarity(ref: torch.Tensor, c: float, seed: int) -> torch.Tensor:
    """A frame whose cosine similarity to ``ref`` is exactly ``c``."""
    r = ref.flatten() / ref.norm()
    n = torch.randn(r.shape, generator=torch.Generator().manual_seed(seed), dtype=r.dtype)
    n = n - (n @ r) * r
    n = n / n.norm()
    return (c * r + math.sqrt(1 - c * c) * n).view(ref.shape)


def test_identical_frames_skip_until_max_skip_frames_then_process():
    f = SimilarityFilter(threshold=0.98, max_skip_frames=10, rng=random.Random(1))
    same = frame(0)
    pattern = [f.decide(same).skip for _ in range(1 + 11 * 5)]
    # identical frames: skip probability 1, so exactly: process, then 10 skips, then forced, ...
    assert pattern == [False] + ([True] * 10 + [False]) * 5
    assert (f.processed, f.skipped) == (6, 50)


@pytest.mark.parametrize("max_skip", [0, 1, 3])
def test_max_skip_frames_is_honoured(max_skip):
    f = SimilarityFilter(threshold=0.5, max_skip_frames=max_skip, rng=random.Random(2))
    same = frame(1)
    decisions = [f.decide(same).skip for _ in range(40)]
    run = longest = 0
    for skip in decisions:
        run = run + 1 if skip else 0
        longest = max(longest, run)
    assert longest == max_skip
    cycles, rest = divmod(39, max_skip + 1)  # after the first frame: (skip x m, process) repeating
    assert sum(decisions) == cycles * max_skip + min(rest, max_skip)


def test_random_frames_are_never_skipped():
    f = SimilarityFilter(rng=random.Random(3))
    decisions = [f.decide(frame(i)) for i in range(200)]
    assert not any(d.skip for d in decisions)
    sims = [d.similarity for d in decisions[1:]]
    assert max(sims) < 0.5  # independent uniform frames in [-1, 1] are near orthogonal


@pytest.mark.parametrize("c", [0.985, 0.99, 0.995])
def test_skip_rate_matches_the_probability(c):
    """Each trial: a fresh reference, then one frame at similarity c: skipped with probability
    (c - eta) / (1 - eta)."""
    rng = random.Random(4)
    trials, skips = 3000, 0
    for i in range(trials):
        f = SimilarityFilter(threshold=0.98, max_skip_frames=10, rng=rng)
        ref = frame(i)
        f.decide(ref)
        d = f.decide(with_similarity(ref, c, i))
        assert d.similarity == pytest.approx(c, abs=1e-4)
        skips += d.skip
    p = (c - 0.98) / (1 - 0.98)
    assert abs(skips / trials - p) < 4 * math.sqrt(p * (1 - p) / trials)


def test_filter_compares_with_the_last_processed_frame_not_the_last_seen():
    f = SimilarityFilter(threshold=0.0, max_skip_frames=100, rng=random.Random(5))
    ref = frame(7)
    f.decide(ref)
    near = with_similarity(ref, 0.999, 1)
    assert f.decide(near).skip  # p = 0.999
    d = f.decide(with_similarity(ref, 0.6, 2))  # still compared with ref, not with `near`
    assert d.similarity == pytest.approx(0.6, abs=1e-4)


def test_same_seed_same_decisions_and_can_skip():
    frames = [with_similarity(frame(0), 0.99, i) for i in range(50)]
    runs = []
    for _ in range(2):
        f = SimilarityFilter(rng=random.Random(9))
        f.decide(frame(0))
        runs.append([f.decide(x).skip for x in frames])
    assert runs[0] == runs[1] and 0 < sum(runs[0]) < 50
    f = SimilarityFilter(rng=random.Random(9))
    f.decide(frame(0))
    assert not any(f.decide(x, can_skip=False).skip for x in frames)


def test_bad_filter_parameters():
    with pytest.raises(ValueError):
        SimilarityFilter(threshold=1.5)
    with pytest.raises(ValueError):
        SimilarityFilter(max_skip_frames=-1)
    assert SimilarityFilter(threshold=1.0).skip_probability(1.0) == 0.0


def test_drop_oldest_queue():
    woken = []
    q: DropOldestQueue[int] = DropOldestQueue(3, on_put=lambda: woken.append(1))
    dropped = [q.put(i) for i in range(5)]
    assert dropped == [None, None, None, 0, 1]
    assert (q.dropped, q.put_total, len(q), len(woken)) == (2, 5, 3, 5)
    assert q.take(2) == [2, 3]
    assert q.take(5) == [4]
    assert q.take(1) == []
    with pytest.raises(ValueError):
        DropOldestQueue(0)


# -- image codec --------------------------------------------------------------------------------


def rgb(w=16, h=12, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encoded(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    im = Image.fromarray(pixels)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", list(ImageFormat))
def test_round_trip(fmt):
    yy, xx = np.mgrid[0:12, 0:16]
    px = np.stack([xx * 15, yy * 20, (xx + yy) * 8], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it
    data = encode_image(px, fmt, 95)
    assert (data.width, data.height, data.format) == (16, 12, fmt)
    back = decode_image(data, 16, 12, 1 << 20)
    assert back.shape == (12, 16, 3) and back.dtype == np.uint8
    if fmt != ImageFormat.JPEG:
        assert np.array_equal(back, px)  # lossless
    else:
        assert np.abs(back.astype(int) - px).mean() < 6


def test_palette_png_is_rgb():
    data = ImageData(encoded(rgb(), "PNG", "P"), ImageFormat.PNG)
    assert decode_image(data, 16, 12, 1 << 20).shape == (12, 16, 3)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (ImageData(b"", ImageFormat.PNG), "no image bytes"),
        (ImageData(b"not an image at all", ImageFormat.PNG), "not a readable PNG"),
        (ImageData(encoded(rgb(), "JPEG"), ImageFormat.PNG), "declared PNG but its bytes are JPEG"),
        (ImageData(encoded(rgb(), "PNG")[:60], ImageFormat.PNG), "corrupt or truncated"),
        (ImageData(encoded(rgb(), "PNG", "RGBA"), ImageFormat.PNG), r"4 channel\(s\) \(RGBA\)"),
        (ImageData(encoded(rgb(), "PNG", "L"), ImageFormat.PNG), r"1 channel\(s\) \(L\)"),
        (ImageData(encoded(rgb(32, 32), "PNG"), ImageFormat.PNG), "frame is 32x32 pixels"),
        (ImageData(encoded(rgb(20, 12), "PNG"), ImageFormat.PNG), "larger than this stream"),
        (ImageData(encoded(rgb(), "PNG"), ImageFormat.PNG, 8, 8), "declared 8x8"),
        (ImageData(rgb().tobytes(), ImageFormat.RAW_RGB), "need their width and height"),
        (ImageData(rgb().tobytes(), ImageFormat.RAW_RGB, 16, 12, 4), "3 channels"),
        (ImageData(rgb().tobytes()[:-1], ImageFormat.RAW_RGB, 16, 12), "needs 576 bytes"),
        (ImageData(rgb(12, 16).tobytes(), ImageFormat.RAW_RGB, 12, 16), "takes 16x12"),
        (ImageData(b"x" * 5000, ImageFormat.RAW_RGB, 16, 12), "at most 4096"),
    ],
)
def test_bad_frames_are_invalid_requests(image, message):
    with pytest.raises(InvalidRequest, match=message):
        decode_image(image, 16, 12, 4096)
