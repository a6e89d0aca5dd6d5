"""Position captions and single-shape views of synthetic batches: the first two steps of the relation
curriculum (`bench/itm_relation.py --objective curriculum`).

Why: ITM trained from scratch on relation swaps ("a red circle left of a blue square" against "... right
of ...") stays at ln 2, because the signal is a product of three things the model has not learned
yet (which shape a colour word names, where that shape is, which way the relation word points), and
the gradient of a product of untrained factors is near zero. Two easier tasks build the factors one
at a time:

1. single shape: the image keeps one shape (the others painted over with the background) and the
   caption says on which side of the canvas it lies ("the red circle is left" against "... is right"):
   only where the one non-background blob is, against the side word: learned in a few hundred steps;
2. position on the full scene: the same captions about one shape among 2-4: now the colour word must
   pick the shape;
3. then relation swaps, which compare two such positions.

The captions reuse the scenes' grammar words ("the", "is", "left", "right", "above", "below", colours,
shapes) so that the datasets' own tokenizer covers them; "left" here means the left half of the canvas.
Everything works on collated batches (`boxes` in output pixels, `box_categories` indexing the
datasets' `box_labels`), so any synthetic dataset serves, with no second dataset to build.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

import torch

from data_tools.batch import host_view
from data_tools.errors import UserError
from data_tools.synthetic import BACKGROUND
from data_tools.transforms import normalise

SIDES = {"h": ("left", "right"), "v": ("above", "below")}
"""Per axis, the words for the low and the high half of the canvas."""
MARGIN = 2.0
"""A box centre closer than this many pixels to the canvas centre line says nothing about that axis."""

NORMALISED_BACKGROUND: list[float] = (
    normalise(torch.tensor(BACKGROUND, dtype=torch.uint8).view(1, 1, 1, 3)).flatten().tolist()
)
"""The scenes' background colour as `normalise` maps it (channel order), for painting `pixel_values`."""


@dataclasses.dataclass(frozen=True)
class PositionPair:
    """One sample's position caption: `true` holds for its shape, `false` names the opposite half."""

    row: int  # the sample's row in the batch
    box: int  # the shape's index among the sample's boxes
    true: str
    false: str


def position_pairs(
    batch: dict[str, Any], categories: Sequence[str], image_size: int, rng: random.Random
) -> list[PositionPair]:
    """For every real sample with a labelled box: one random box and one random axis along which its
    centre is at least MARGIN pixels from the centre line; samples without such a box are left out.
    `categories` lists the box labels by class index ("<colour> <shape>": the synthetic scenes')."""
    pairs = []
    half = image_size / 2
    host = host_view(batch)  # the loader's tensors: reading them as numbers waits for no device
    for row, (real, boxes, classes) in enumerate(
        zip(host["sample_mask"].tolist(), host["boxes"], host["box_categories"])
    ):
        if not real or len(boxes) == 0:
            continue
        box = rng.randrange(len(boxes))
        label = int(classes[box])
        if label < 0:
            continue
        x1, y1, x2, y2 = boxes[box].tolist()
        offsets = {"h": (x1 + x2) / 2 - half, "v": (y1 + y2) / 2 - half}
        axes = [axis for axis, offset in offsets.items() if abs(offset) >= MARGIN]
        if not axes:
            continue
        axis = rng.choice(axes)
        low, high = SIDES[axis]
        side, other = (low, high) if offsets[axis] < 0 else (high, low)
        name = categories[label]
        pairs.append(PositionPair(row, box, f"the {name} is {side}", f"the {name} is {other}"))
    return pairs


def single_shape_view(batch: dict[str, Any], pairs: Sequence[PositionPair]) -> dict[str, Any]:
    """The batch with each pair's image reduced to the pair's shape: every other box (one pixel wider on
    each side, for anti-aliased edges) painted over with the scenes' background colour. Works on the
    loader's uint8 `pixel_uint8` [B, S, S, 3] and on the device's normalised `pixel_values` [B, 3, S, S];
    rows without a pair, and the given batch, are unchanged."""
    key = "pixel_uint8" if "pixel_uint8" in batch else "pixel_values"
    if key not in batch:
        raise UserError("objectives.position: the batch has no pixels (it needs data.visual=pixels)")
    pixels = batch[key].clone()
    channels_last = key == "pixel_uint8"
    colour = list(BACKGROUND) if channels_last else NORMALISED_BACKGROUND  # scalars: nothing copied to the device
    for pair in pairs:
        for index, (x1, y1, x2, y2) in enumerate(host_view(batch)["boxes"][pair.row].tolist()):
            if index != pair.box:
                rows, cols = slice(max(0, int(y1) - 1), int(y2) + 2), slice(max(0, int(x1) - 1), int(x2) + 2)
                for channel, value in enumerate(colour):
                    if channels_last:
                        pixels[pair.row, rows, cols, channel] = value
                    else:
                        pixels[pair.row, channel, rows, cols] = value
    return {**batch, key: pixels}
