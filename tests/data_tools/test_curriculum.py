"""The relation curriculum's batch helpers (data_tools/curriculum.py): which position caption each
sample gets (the box's half of the canvas along an axis where its centre is clear of the centre line,
the opposite half as the false caption; no caption for an unlabelled or centred box), and single-shape
views that paint every other box over with the background while leaving the chosen one intact."""

from __future__ import annotations

import random

import pytest
import torch

from data_tools.curriculum import MARGIN, position_pairs, single_shape_view
from data_tools.synthetic import BACKGROUND

SIZE = 32
CATEGORIES = ["blue square", "red circle"]


def batch(boxes: list[list[list[float]]], classes: list[list[int]], real: list[bool] | None = None) -> dict:
    pixels = torch.zeros(len(boxes), SIZE, SIZE, 3, dtype=torch.uint8)
    for i, rows in enumerate(boxes):
        for k, (x1, y1, x2, y2) in enumerate(rows):
            pixels[i, int(y1) : int(y2), int(x1) : int(x2)] = 10 + k  # each box its own value
    return {
        "boxes": [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
        "box_categories": [torch.tensor(c, dtype=torch.long) for c in classes],
        "sample_mask": torch.tensor(real if real is not None else [True] * len(boxes)),
        "pixel_uint8": pixels,
    }


def test_position_caption_names_the_half_the_box_lies_in_and_its_opposite():
    # red circle centred at (6, 26): left (x offset -10) and below (y offset +10), whichever axis is drawn
    b = batch([[[2, 22, 10, 30]]], [[1]])
    seen = set()
    for seed in range(20):
        (pair,) = position_pairs(b, CATEGORIES, SIZE, random.Random(seed))
        assert pair.row == 0 and pair.box == 0
        seen.add((pair.true, pair.false))
    assert seen == {
        ("the red circle is left", "the red circle is right"),
        ("the red circle is below", "the red circle is above"),
    }


def test_position_caption_uses_only_an_axis_clear_of_the_centre_line():
    # centre x = 16 (on the vertical centre line), centre y = 5 (top): only "above" can be said
    b = batch([[[12, 1, 20, 9]]], [[0]])
    texts = {position_pairs(b, CATEGORIES, SIZE, random.Random(seed))[0].true for seed in range(10)}
    assert texts == {"the blue square is above"}


@pytest.mark.parametrize(
    "boxes, classes, real",
    [
        ([[[12, 12, 20, 20]]], [[0]], [True]),  # centred on both axes
        ([[[2, 2, 8, 8]]], [[-1]], [True]),  # no label
        ([[]], [[]], [True]),  # no box
        ([[[2, 2, 8, 8]]], [[0]], [False]),  # padding slot
    ],
)
def test_no_position_caption_when_nothing_can_be_said(boxes, classes, real):
    assert position_pairs(batch(boxes, classes, real), CATEGORIES, SIZE, random.Random(0)) == []


def test_margin_is_the_centre_offset_that_still_counts():
    x1 = SIZE / 2 - MARGIN - 2  # centre exactly MARGIN left of the centre line; y centred
    b = batch([[[x1, 12, x1 + 4, 20]]], [[1]])
    assert position_pairs(b, CATEGORIES, SIZE, random.Random(0))[0].true == "the red circle is left"


def test_single_shape_view_paints_other_boxes_and_keeps_the_chosen_one():
    b = batch([[[2, 2, 8, 8], [20, 20, 28, 28]], [[2, 20, 8, 28]]], [[0, 1], [1]])
    pairs = position_pairs(b, CATEGORIES, SIZE, random.Random(3))
    assert len(pairs) == 2
    out = single_shape_view(b, pairs)["pixel_uint8"]
    chosen = pairs[0].box
    other = 1 - chosen
    x1, y1, x2, y2 = (int(v) for v in b["boxes"][0][other])
    assert (out[0, y1:y2, x1:x2] == torch.tensor(BACKGROUND, dtype=torch.uint8)).all()
    x1, y1, x2, y2 = (int(v) for v in b["boxes"][0][chosen])
    assert torch.equal(out[0, y1:y2, x1:x2], b["pixel_uint8"][0, y1:y2, x1:x2])
    assert torch.equal(out[1], b["pixel_uint8"][1])  # one shape only: nothing to paint
    assert b["pixel_uint8"][0].max() == 11  # the batch itself is untouched
