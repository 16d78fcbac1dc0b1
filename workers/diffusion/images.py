"""Image bytes <-> ``height x width x 3`` uint8 RGB arrays, with the checks that make a bad frame
an INVALID_ARGUMENT that says what to fix (never a crashed actor).

Accepted: PNG and JPEG (RGB, or palette PNG which is RGB by construction) and raw RGB bytes
with an explicit shape. Rejected with a reason: empty or oversized data, undecodable bytes, a
declared format that does not match the data, alpha or grayscale images (wrong channel count),
raw bytes whose length does not match the shape, and sizes other than the stream's.
"""

from __future__ import annotations

import io

import numpy as np

from wattserve.errors import InvalidRequest
from wattserve.images import ImageData, ImageFormat

_PIL_FORMATS = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG"}
#: PIL modes that hold exactly three colour channels once converted (P: a palette of RGB colours)
_RGB_MODES = {"RGB": "RGB", "P": "RGB", "YCbCr": "RGB"}
_CHANNELS = {"1": 1, "L": 1, "LA": 2, "I": 1, "I;16": 1, "F": 1, "RGBA": 4, "RGBa": 4, "CMYK": 4, "PA": 2, "La": 2}


def decode_image(image: ImageData, width: int, height: int, max_bytes: int) -> np.ndarray:
    """Pixels of ``image`` as a ``height x width x 3`` uint8 array; ``width``/``height`` are what
    the stream expects. Raises InvalidRequest naming the problem."""
    data = image.data
    if not data:
        raise InvalidRequest("frame has no image bytes")
    if len(data) > max_bytes:
        raise InvalidRequest(f"frame is {len(data)} bytes; this expert accepts at most {max_bytes}")
    if image.format == ImageFormat.RAW_RGB:
        pixels = _decode_raw(image)
    else:
        pixels = _decode_compressed(image, width * height)
    h, w = pixels.shape[:2]
    if (w, h) != (width, height):
        raise InvalidRequest(f"frame is {w}x{h} pixels; this stream takes {width}x{height} (width x height)")
    return pixels


def _decode_raw(image: ImageData) -> np.ndarray:
    w, h, c = image.width, image.height, image.channels or 3
    if w <= 0 or h <= 0:
        raise InvalidRequest("raw RGB frames need their width and height (both > 0)")
    if c != 3:
        raise InvalidRequest(f"raw frames must have 3 channels (RGB), got {c}")
    expected = w * h * 3
    if len(image.data) != expected:
        raise InvalidRequest(
            f"raw RGB frame of {w}x{h} needs {expected} bytes (width x height x 3), got {len(image.data)}"
        )
    return np.frombuffer(image.data, dtype=np.uint8).reshape(h, w, 3)


def _decode_compressed(image: ImageData, max_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    want = _PIL_FORMATS.get(ImageFormat(image.format))
    try:
        im = Image.open(io.BytesIO(image.data))  # lazy: reads the header only
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRequest(f"frame bytes are not a readable {want} image ({type(exc).__name__})") from None
    if im.format != want:
        raise InvalidRequest(f"frame was declared {want} but its bytes are {im.format or 'unknown'}")
    w, h = im.size
    if image.width and image.height and (w, h) != (image.width, image.height):
        raise InvalidRequest(f"frame declared {image.width}x{image.height} but its {want} data is {w}x{h}")
    if w * h > max(max_pixels, 1):  # before decoding: a small file can unpack to a huge image
        raise InvalidRequest(f"frame is {w}x{h} pixels, larger than this stream's size")
    if im.mode not in _RGB_MODES:
        channels = _CHANNELS.get(im.mode, len(im.getbands()))
        raise InvalidRequest(f"frame has {channels} channel(s) ({im.mode}); send RGB images (3 channels, no alpha)")
    try:
        rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data shows up here
        raise InvalidRequest(f"frame {want} data is corrupt or truncated ({exc})") from None
    return np.asarray(rgb, dtype=np.uint8)


def encode_image(pixels: np.ndarray, fmt: ImageFormat, jpeg_quality: int = 90) -> ImageData:
    """Encode a ``height x width x 3`` uint8 array."""
    h, w = pixels.shape[:2]
    fmt = ImageFormat(fmt)
    if fmt == ImageFormat.RAW_RGB:
        return ImageData(np.ascontiguousarray(pixels).tobytes(), fmt, w, h, 3)
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    if fmt == ImageFormat.JPEG:
        im.save(buf, format="JPEG", quality=jpeg_quality or 90)
    else:
        im.save(buf, format="PNG", compress_level=1)  # speed over size: this is a live stream
    return ImageData(buf.getvalue(), fmt, w, h, 3)
