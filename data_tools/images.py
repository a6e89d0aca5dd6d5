"""Safe image decoding shared by the builders and the loader: PIL with a pixel limit, RGB output.

A decompression bomb, a truncated file or a non-image raises BadSample with the reason, never a
PIL warning or a crash.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image

from data_tools.errors import BadSample

DEFAULT_MAX_PIXELS = 64_000_000
"""Default pixel limit (about 8000 x 8000); configurable by every builder and the loader."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily (header only) and check the pixel count before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("too_many_pixels", str(err)) from None
    except Exception as err:  # PIL raises many types for garbage input
        raise BadSample("decode_error", f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes fully to an RGB PIL image; raises BadSample on any problem."""
    image = open_image(data, max_pixels)
    try:
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image
    except Exception as err:
        raise BadSample("decode_error", f"{type(err).__name__}: {err}") from None
