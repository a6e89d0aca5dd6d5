"""Image transforms that carry boxes and phrase links along (train: random resized crop; eval: resize
and centre crop), and batched normalisation.

Why here and not torchvision: torchvision is unusable in this environment, and boxes must follow
the exact crop. All randomness comes from a torch.Generator seeded by (seed, epoch, key), so the
crop of a sample does not depend on which rank or worker reads it. Horizontal flip is off by
default because captions name left and right.

Resampling: antialiased bilinear on the uint8 pixels of the crop with torch (`interpolate(...,
antialias=True)`, the filter of PIL's BILINEAR: PIL's crop-then-resize within one level), about
2.5x faster than PIL's resize on one core, where it was the loader's largest cost after JPEG
decoding. (PIL's `resize(box=...)` also reads pixels just outside the box, so its border rows differ
by a few levels.) Crop boxes are whole pixels so that the crop is a slice.

Normalisation (`normalise`) runs where the pixels are consumed: the loader hands out uint8
(`pixel_uint8`, a quarter of the bytes between processes and to the device) and
`pretrain.engine.to_engine` normalises on the training device; `normalise_batch` does it for any
other consumer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from data_tools.order import sample_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Normalisation of the EfficientNet-Lite grid backbone and of most patch embedders."""
CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect ratio range of the random resized crop (as torchvision's RandomResizedCrop)."""
MIN_VISIBLE_FRACTION = 0.25
"""A box is dropped (with its phrase links) when less than this fraction of its area stays in the crop."""


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], gen: torch.Generator
) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) of a random resized crop: area fraction in `scale`, log-uniform ratio in CROP_RATIO.

    Ten tries as torchvision, then the centre crop at the clamped ratio.
    """
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    draws = torch.rand(10, 4, generator=gen).tolist()  # one draw of all tries: fixed consumption
    for u_area, u_ratio, u_x, u_y in draws:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return float(int(u_x * (width - w + 1))), float(int(u_y * (height - h + 1))), float(w), float(h)
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return float((width - w) // 2), float((height - h) // 2), float(w), float(h)


def centre_crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square (whole pixels): resizing the shorter side to S and centre-cropping S x S, in one step."""
    side = min(width, height)
    return float((width - side) // 2), float((height - side) // 2), float(side), float(side)


def resize_crop(image: np.ndarray, crop: tuple[float, float, float, float], size: int, mirrored: bool) -> np.ndarray:
    """The whole-pixel `crop` (x0, y0, w, h) of RGB pixels [H, W, 3] uint8, resized to size x size
    (antialiased bilinear) and optionally mirrored: uint8 [size, size, 3]."""
    x0, y0, cw, ch = (int(v) for v in crop)
    region = torch.from_numpy(image)[y0 : y0 + ch, x0 : x0 + cw]  # [h, w, 3] view
    region = region.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)  # [1, 3, h, w]
    out = torch.nn.functional.interpolate(
        region, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    if mirrored:
        out = out.flip(3)
    return out[0].permute(1, 2, 0).contiguous().numpy()  # [S, S, 3]


def crop_boxes(
    boxes: np.ndarray, crop: tuple[float, float, float, float], size: int, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Stored-pixel boxes [k, 4] (x, y, w, h) -> output-pixel boxes [k', 4] (x1, y1, x2, y2) and the kept indices [k'].

    float32 throughout, a dozen numpy calls whatever k (this runs for every sample with boxes).
    """
    x0, y0, cw, ch = crop
    sx, sy = size / cw, size / ch
    xyxy = np.empty((len(boxes), 4), dtype=np.float32)  # [k, 4]
    np.add(boxes[:, :2], boxes[:, 2:], out=xyxy[:, 2:])
    xyxy[:, :2] = boxes[:, :2]
    xyxy -= np.array([x0, y0, x0, y0], dtype=np.float32)
    xyxy *= np.array([sx, sy, sx, sy], dtype=np.float32)
    clipped = np.minimum(np.maximum(xyxy, np.float32(0.0)), np.float32(size))  # [k, 4]
    extent = xyxy[:, 2:] - xyxy[:, :2]  # [k, 2]
    area = extent[:, 0] * extent[:, 1]
    seen = np.maximum(clipped[:, 2:] - clipped[:, :2], np.float32(0.0))  # [k, 2]
    visible = seen[:, 0] * seen[:, 1]
    kept = np.flatnonzero((visible > 0) & (visible >= MIN_VISIBLE_FRACTION * np.maximum(area, 1e-9)))
    out = clipped[kept]
    if flip:
        out = np.stack([size - out[:, 2], out[:, 1], size - out[:, 0], out[:, 3]], axis=1)
    return out.astype(np.float32).reshape(-1, 4), kept


def relink_phrases(phrases: list[dict[str, Any]] | None, kept: np.ndarray) -> list[dict[str, Any]] | None:
    """Phrase links after boxes were dropped: indices renumbered, phrases left without boxes dropped."""
    if phrases is None:
        return None
    new_index = {int(old): new for new, old in enumerate(kept.tolist())}
    out = []
    for p in phrases:
        links = [new_index[b] for b in p["boxes"] if b in new_index]
        if links:
            out.append({"span": p["span"], "boxes": links})
    return out


def transform_sample(
    sample: dict[str, Any],
    *,
    image_size: int,
    train: bool,
    crop_scale: tuple[float, float],
    flip: bool,
    seed: int,
    epoch: int,
) -> dict[str, Any]:
    """Crop and resize the image to image_size x image_size (uint8 [S, S, 3] in `pixels`), boxes and phrases along."""
    image: np.ndarray | None = sample["image"]  # uint8 [H, W, 3]
    out = dict(sample, image=None, pixels=None)
    if image is None:  # features only: boxes stay in stored pixels, as x1, y1, x2, y2
        if sample["boxes"] is not None:
            b = sample["boxes"]
            out["boxes"] = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1).astype(np.float32)
        return out
    height, width = image.shape[:2]
    gen = torch.Generator().manual_seed(sample_seed(seed, epoch, sample["key"], "crop", sample["repeat"]))
    crop = random_crop_box(width, height, crop_scale, gen) if train else centre_crop_box(width, height)
    mirrored = bool(train and flip and float(torch.rand(1, generator=gen)) < 0.5)
    out["pixels"] = resize_crop(image, crop, image_size, mirrored)  # [S, S, 3] uint8
    if sample["boxes"] is not None:
        out["boxes"], kept = crop_boxes(sample["boxes"], crop, image_size, mirrored)
        out["phrases"] = relink_phrases(sample["phrases"], kept)
        if sample.get("box_labels") is not None:
            out["box_labels"] = [sample["box_labels"][i] for i in kept.tolist()]
    return out


_SCALE = tuple(1.0 / (255.0 * s) for s in IMAGENET_STD)
_SHIFT = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S], ImageNet mean and std, on the pixels' device.

    One strided copy into a contiguous float tensor, then in-place scale and shift per channel with
    Python scalars: about 6x faster on CPU than arithmetic on the permuted view, and on a GPU no
    host-to-device copy of constants (which would synchronise with the host).
    """
    batch, height, width, _ = pixels.shape
    out = torch.empty(batch, 3, height, width, dtype=torch.float32, device=pixels.device)  # [B, 3, S, S]
    out.copy_(pixels.permute(0, 3, 1, 2))
    for channel in range(3):
        out[:, channel].mul_(_SCALE[channel]).add_(_SHIFT[channel])
    return out


def normalise_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A loader batch with `pixel_uint8` replaced by normalised `pixel_values` (data_tools.batch),
    computed wherever `pixel_uint8` lives (move it to the device first to normalise there)."""
    if "pixel_uint8" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "pixel_uint8"}
    out["pixel_values"] = normalise(batch["pixel_uint8"])  # [B, 3, S, S]
    return out
