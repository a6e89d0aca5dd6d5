"""The loader's pixel decoding (`images.decode_pixels`): the simplejpeg path for colour and grey JPEGs
gives PIL's pixels bit for bit, everything else (CMYK, PNG, damaged bytes) goes through PIL, and
every problem is the BadSample PIL's path reports."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg  # a core dependency: a broken install fails here, it is not skipped
from PIL import Image

from data_tools import images
from data_tools.errors import BadSample


def photo(mode: str = "RGB", size=(97, 61)) -> Image.Image:
    """Smooth photo-like content (odd sizes: chroma subsampling edges)."""
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC).convert(mode)


def encoded(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(images.decode_image(data))


CASES = {
    "ycbcr 4:2:0": encoded(photo(), quality=90),
    "ycbcr 4:4:4": encoded(photo(), quality=95, subsampling=0),
    "progressive": encoded(photo(), progressive=True),
    "grey": encoded(photo("L")),
    "cmyk": encoded(photo("CMYK")),  # simplejpeg's CMYK -> RGB differs from PIL's: PIL decodes it
    "png": encoded(photo(), "PNG"),
    "png rgba": encoded(photo("RGBA"), "PNG"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("fast", [True, False], ids=["simplejpeg", "pil-only"])
def test_pixels_are_pils_bit_for_bit(name, fast, monkeypatch):
    if fast:
        assert images.simplejpeg is simplejpeg
    else:
        monkeypatch.setattr(images, "simplejpeg", None)
    data = CASES[name]
    pixels = images.decode_pixels(data)
    want = pil_pixels(data)
    assert pixels.dtype == np.uint8 and pixels.shape == (61, 97, 3) and pixels.flags.c_contiguous
    assert pixels.flags.writeable  # torch.from_numpy takes it without a warning
    assert np.array_equal(pixels, want)


def test_colour_jpegs_take_the_simplejpeg_path(monkeypatch):
    calls = []
    monkeypatch.setattr(images, "decode_image", lambda *a, **k: calls.append(a) or Image.new("RGB", (1, 1)))
    for name in ("ycbcr 4:2:0", "progressive", "grey"):
        assert images.decode_pixels(CASES[name]).shape == (61, 97, 3)
    assert calls == []  # PIL never called for these
    images.decode_pixels(CASES["cmyk"])
    assert len(calls) == 1
    assert simplejpeg.decode_jpeg_header(CASES["cmyk"])[2] not in images._SIMPLEJPEG_COLOURS


@pytest.mark.parametrize("fast", [True, False], ids=["simplejpeg", "pil-only"])
def test_damaged_and_oversized_images_are_bad_samples_with_pils_reason(fast, monkeypatch):
    if not fast:
        monkeypatch.setattr(images, "simplejpeg", None)
    truncated = CASES["ycbcr 4:2:0"][: len(CASES["ycbcr 4:2:0"]) // 2]
    for data in (truncated, b"\xff\xd8 not a jpeg at all", b"\xff\xd8"):
        with pytest.raises(BadSample) as got:
            images.decode_pixels(data)
        with pytest.raises(BadSample) as want:
            images.decode_image(data)
        assert (got.value.reason, str(got.value)) == (want.value.reason, str(want.value))
    with pytest.raises(BadSample) as err:
        images.decode_pixels(CASES["ycbcr 4:2:0"], max_pixels=97 * 61 - 1)
    assert err.value.reason == "too_many_pixels" and "97x61 > 5916 pixels" in str(err.value)
    assert images.decode_pixels(CASES["ycbcr 4:2:0"], max_pixels=97 * 61).shape == (61, 97, 3)


def test_every_coco_photo_decodes_to_pils_pixels(coco_mini):
    photos = sorted((coco_mini / "images").rglob("*.jpg"))
    assert len(photos) > 100
    for path in photos:
        data = path.read_bytes()
        assert np.array_equal(images.decode_pixels(data), pil_pixels(data)), path.name
