"""Safe image decoding shared by the builders and the loader: PIL with a pixel limit, RGB output,
plus what the builders need on top: resize + re-encode, and the content hash used for dedup.

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

from PIL import Image

from data_tools.errors import BadSample

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
        return StoredImage(
            encode_jpeg(resized, quality), "jpg", *new_size, (new_size[0] / width, new_size[1] / height)
        )
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
