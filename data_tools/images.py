"""Safe image decoding shared by the builders and the loader: PIL with a pixel limit, RGB output,
plus what the builders need on top: resize + re-encode, and the content hash used for dedup.

The loader takes pixels, not PIL images (`decode_pixels`): a colour or grey JPEG is decoded by
simplejpeg (libjpeg-turbo, as PIL's decoder, with the same IDCT and upsampling: the same pixels,
bit for bit) straight into a numpy array, in 0.63 of the time PIL takes to decode and hand the
pixels over (0.48 vs 0.76 ms for a COCO photo stored at 384 px, `bench/bench_loader.py`); decoding
is most of the loader's time on photos. Every other image, and any JPEG simplejpeg refuses, goes
through PIL, whose error is the one reported.

A decompression bomb, a truncated file or a non-image raises BadSample with the reason, never a
PIL warning or a crash. The pixel limit given here is the one that decides: PIL's own global guard
(`Image.MAX_IMAGE_PIXELS`, which warns above ~89 MP and raises above twice that) would otherwise
reject images that a user explicitly allowed with a higher limit, so it is switched off and our
check runs on the header before any pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import warnings

import numpy as np
from PIL import Image

from data_tools.errors import BadSample

try:
    import simplejpeg
except ImportError:  # optional speed-up: PIL decodes everything without it
    simplejpeg = None

DEFAULT_MAX_PIXELS = 64_000_000
"""Default pixel limit (about 8000 x 8000); configurable by every builder and the loader."""

DEFAULT_QUALITY = 90
"""JPEG quality used when an image is re-encoded (resize, or a format shards do not store)."""

STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
"""PIL format -> shard member extension for images whose original bytes are kept as they are."""


def _describe(err: Exception) -> str:
    """An exception as one stable line: object reprs with memory addresses removed (reproducible rejected.jsonl)."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", f"{type(err).__name__}: {err}")


def _disable_pil_guard() -> None:
    # Idempotent: our own header check (below) replaces PIL's global decompression-bomb guard.
    Image.MAX_IMAGE_PIXELS = None


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily (header only) and check the pixel count before decoding."""
    _disable_pil_guard()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("too_many_pixels", str(err)) from None
    except Exception as err:  # PIL raises many types for garbage input
        raise BadSample("decode_error", _describe(err)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes fully to an RGB PIL image; raises BadSample on any problem."""
    return decode_image_from(open_image(data, max_pixels))


_JPEG_MAGIC = b"\xff\xd8"
_SIMPLEJPEG_COLOURS = ("YCbCr", "Gray")
"""JPEG colour spaces whose RGB decoding by simplejpeg equals PIL's (CMYK and YCCK do not)."""


def decode_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to uint8 RGB pixels [H, W, 3] (C-contiguous); BadSample on any problem,
    with the pixel limit checked on the header first (module docstring: the fast JPEG path)."""
    if simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        try:
            height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        except Exception:  # untrusted bytes: whatever the extension raises, PIL says what is wrong
            colour = None
        if colour in _SIMPLEJPEG_COLOURS:
            if width * height > max_pixels:
                raise BadSample("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB")  # strict: warnings (truncation) raise
            except Exception:
                pass  # PIL decodes it or names the problem
    return np.array(decode_image(data, max_pixels))  # a writable copy (asarray would be read-only)


def content_hash(data: bytes) -> str:
    """sha256 hex of image bytes: the identity used to merge identical images into one sample."""
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class StoredImage:
    """An image as it goes into a shard."""

    data: bytes
    extension: str  # one of schema.IMAGE_EXTENSIONS
    width: int
    height: int
    scale: tuple[float, float]  # (x, y) factors from the input pixels to the stored ones (boxes follow)


def encode_jpeg(image: Image.Image, quality: int = DEFAULT_QUALITY) -> bytes:
    """Deterministic baseline JPEG (no EXIF, no timestamps): same pixels -> same bytes."""
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()


def prepare_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
) -> StoredImage:
    """Validate image bytes by decoding them fully and return what to store.

    Original bytes are kept unless the longer side exceeds `max_side` (then the image is resized,
    aspect ratio kept, and re-encoded as JPEG at `quality`) or the format is not one shards store
    (GIF, BMP, TIFF...: re-encoded as JPEG). A full decode happens either way, because a truncated
    file only fails there.
    """
    image = open_image(data, max_pixels)
    fmt = image.format
    width, height = image.size
    if max_side is not None and max(width, height) > max_side:
        ratio = max_side / max(width, height)
        new_size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        if fmt == "JPEG":
            # DCT-domain downscaling while decoding, to no less than twice the target (as
            # Image.thumbnail does): much less work for large photos, same look after the resize.
            image.draft("RGB", (2 * new_size[0], 2 * new_size[1]))
        resized = decode_image_from(image).resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return StoredImage(encode_jpeg(resized, quality), "jpg", *new_size, (new_size[0] / width, new_size[1] / height))
    rgb = decode_image_from(image)
    if fmt in STORED_FORMATS:
        return StoredImage(data, STORED_FORMATS[fmt], width, height, (1.0, 1.0))
    return StoredImage(encode_jpeg(rgb, quality), "jpg", width, height, (1.0, 1.0))


def decode_image_from(image: Image.Image) -> Image.Image:
    """Finish decoding an image opened by `open_image` (RGB); BadSample on truncated data."""
    try:
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image
    except Exception as err:
        raise BadSample("decode_error", _describe(err)) from None
