"""Synthetic relational scenes (DESIGN.md 4): a few coloured shapes on a canvas, captions from a small
grammar that name attributes and one spatial relation, exact boxes and phrase-to-box links, and one
hard negative per caption, recorded with its kind (`relation`: the relation replaced by its converse;
`attribute`: the two phrases' colours swapped). They let the whole pipeline run anywhere and measure
relation sensitivity by kind (word comparison cannot tell the kind: "a"/"an" follow the colour).

Why captions are provably true and negatives provably false:
- colours are distinct within a scene, so every noun phrase ("a small red circle") names exactly one
  shape (its colour identifies it; size and shape words are that shape's own);
- shapes never touch (boxes at least GAP pixels apart), so every pair is strictly separated along
  at least one axis and "left of"/"above" hold strictly; the swapped relation is then false;
- a colour swap between the two phrases either names a shape that does not exist or states the
  reversed relation of the same pair: false either way.

A scene depends only on (seed, index, image size): same seed -> byte-identical images and captions
whatever process renders them.
"""

from __future__ import annotations

import dataclasses
import io
import random
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (34, 160, 64),
    "blue": (36, 84, 220),
    "yellow": (236, 200, 24),
    "purple": (136, 56, 176),
    "orange": (244, 128, 20),
    "black": (24, 24, 24),
    "gray": (140, 140, 140),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.22), "large": (0.30, 0.38)}
"""Side of a shape's box as a fraction of the canvas side; the ranges are disjoint, so the size word is exact."""
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
"""Each relation and its converse (the relation-swap negative)."""
NEGATIVE_KINDS = ("relation", "attribute")
"""Kinds of hard negatives: the relation swapped for its converse, or the colours of the two phrases swapped."""
BACKGROUND = (246, 244, 238)
GAP = 2
"""Minimum free pixels between two shapes' boxes."""
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 224
TEMPLATES = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}")
GRAMMAR_WORDS = tuple(
    sorted(
        {"a", "an", "the", "is", "there"}
        | {w for rel in RELATIONS for w in rel.split()}
        | set(SIZES)
        | set(COLOURS)
        | set(SHAPES)
    )
)
"""Every word a caption or negative can contain (the tokenizer's vocabulary is built from these)."""

_NOUN_PHRASE = rf"(?:the|an?) (?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"(?:there is )?{_NOUN_PHRASE} (?:is )?({'|'.join(RELATIONS)}) {_NOUN_PHRASE}")
"""Every text the templates produce: (size a, colour a, shape a, relation, size b, colour b, shape b)."""
TRUTH_CHUNK = 256
"""Scenes per step of `truth_table` (its temporaries are [chunk, texts])."""


@dataclasses.dataclass
class Shape:
    kind: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x, y, w, h in pixels; the drawn shape touches all four sides

    def relations_to(self, other: "Shape") -> list[str]:
        """Relations that hold strictly from self to other (pixel boxes are half-open)."""
        x, y, w, h = self.box
        ox, oy, ow, oh = other.box
        found = []
        if x + w <= ox:
            found.append("left of")
        if ox + ow <= x:
            found.append("right of")
        if y + h <= oy:
            found.append("above")
        if oy + oh <= y:
            found.append("below")
        return found


@dataclasses.dataclass
class Scene:
    """One rendered scene: PNG bytes plus the sample metadata of DESIGN.md 3."""

    image: bytes
    width: int
    height: int
    shapes: list[Shape]
    captions: list[str]
    phrases: list[dict[str, Any]]
    negatives: list[list[Any]]  # [[caption index, text, kind], ...], kind in NEGATIVE_KINDS

    @property
    def boxes(self) -> list[list[int]]:
        return [list(s.box) for s in self.shapes]

    @property
    def box_labels(self) -> list[str]:
        """Each box's category, "<colour> <shape>" (the json's `box_labels`: object tags, MRC classes)."""
        return [f"{s.colour} {s.kind}" for s in self.shapes]


def size_word(side: int, canvas: int) -> str:
    """The size word of a shape from its box side: the SIZES range nearest to side / canvas (the ranges
    are disjoint and rounding moves a side by half a pixel at most, so this is exact)."""
    fraction = side / canvas
    return min(SIZES, key=lambda word: max(SIZES[word][0] - fraction, fraction - SIZES[word][1], 0.0))


def shapes_from_metadata(meta: dict[str, Any]) -> list[Shape] | None:
    """A scene's shapes back from its sample json (`boxes` [x, y, w, h], `box_labels` "<colour> <shape>",
    `width`); None for a sample that is not a synthetic scene or whose metadata does not fit one."""
    boxes, labels, width = meta.get("boxes"), meta.get("box_labels"), meta.get("width")
    if (
        meta.get("source") != "synthetic"
        or boxes is None
        or not isinstance(labels, list)
        or len(boxes) != len(labels)
        or not isinstance(width, int)
        or width <= 0
    ):
        return None
    shapes = []
    for box, label in zip(boxes, labels):  # boxes: a json list or the decoder's float32 [k, 4] array
        words = label.split() if isinstance(label, str) else []
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES or len(box) != 4:
            return None
        x, y, w, h = (int(round(float(v))) for v in box)
        shapes.append(Shape(words[1], words[0], size_word(w, width), (x, y, w, h)))
    return shapes


def caption_holds(text: str, shapes: Sequence[Shape]) -> bool | None:
    """Whether a text of the scenes' grammar is true of a scene (see `truth_table`); None for a text the
    grammar cannot produce."""
    table = truth_table([text], [shapes])
    return None if table is None else bool(table[0, 0])


def truth_table(texts: Sequence[str], scenes: Sequence[Sequence[Shape]]) -> np.ndarray | None:
    """[scenes, texts] bool: whether each text is true of each scene, or None when a text is not of the
    scenes' grammar. A text is true when each noun phrase names the shape of its colour (colours are
    distinct within a scene) with that shape word and size word (when given), and the relation holds
    strictly between the two shapes' boxes.

    Why: the grammar is small, so another scene's caption is often true of an image too, which a
    gallery's ground truth (an image's own captions) counts as a miss; evaluation reports recall
    against every true caption as well (finetune.eval_data). Vectorised over scenes x texts (a 5K x
    25K gallery is 125M cells): each text is parsed once, each scene laid out as arrays by colour,
    scenes taken TRUTH_CHUNK at a time.
    """
    colours, kinds, sizes = sorted(COLOURS), list(SHAPES), sorted(SIZES)
    parsed = []
    for text in texts:
        match = _CAPTION.fullmatch(text.strip())
        if match is None:
            return None
        size_a, colour_a, kind_a, relation, size_b, colour_b, kind_b = match.groups()
        parsed.append(
            (
                colours.index(colour_a),
                kinds.index(kind_a),
                -1 if size_a is None else sizes.index(size_a),
                list(RELATIONS).index(relation),
                colours.index(colour_b),
                kinds.index(kind_b),
                -1 if size_b is None else sizes.index(size_b),
            )
        )
    out = np.zeros((len(scenes), len(parsed)), dtype=bool)
    if not parsed or not scenes:
        return out
    # per scene and colour: shape kind (-1: no such colour), size index, box x, y, w, h (int16: pixels <= 224)
    kind = np.full((len(scenes), len(colours)), -1, dtype=np.int16)
    size = np.zeros((len(scenes), len(colours)), dtype=np.int16)
    box = np.zeros((len(scenes), len(colours), 4), dtype=np.int16)
    for i, shapes in enumerate(scenes):
        for shape in shapes:
            c = colours.index(shape.colour)
            kind[i, c], size[i, c], box[i, c] = kinds.index(shape.kind), sizes.index(shape.size), shape.box
    ca, ka, sa, rel, cb, kb, sb = (np.array(column) for column in zip(*parsed))  # [T] each
    for lo in range(0, len(scenes), TRUTH_CHUNK):  # [chunk, T] temporaries: bounded memory at any gallery size
        rows = slice(lo, lo + TRUTH_CHUNK)
        xa, ya, wa, ha = (box[rows][:, ca, n] for n in range(4))  # [chunk, T] each
        xb, yb, wb, hb = (box[rows][:, cb, n] for n in range(4))
        by_name = {"left of": xa + wa <= xb, "right of": xb + wb <= xa, "above": ya + ha <= yb, "below": yb + hb <= ya}
        relation_holds = np.zeros(xa.shape, dtype=bool)
        for r, name in enumerate(RELATIONS):  # as Shape.relations_to
            relation_holds |= by_name[name] & (rel == r)
        named_a = (kind[rows][:, ca] == ka) & ((sa < 0) | (size[rows][:, ca] == sa))
        named_b = (kind[rows][:, cb] == kb) & ((sb < 0) | (size[rows][:, cb] == sb))
        out[rows] = named_a & named_b & (ca != cb) & relation_holds
    return out


def scene_rng(seed: int, index: int) -> random.Random:
    # A str seed is hashed with sha512 by random.Random: stable across runs and PYTHONHASHSEED.
    return random.Random(f"relalign-synthetic:{seed}:{index}")


def place_shapes(rng: random.Random, image_size: int) -> list[Shape]:
    """2-4 shapes with distinct colours at random non-touching positions (rejection sampling)."""
    while True:
        count = rng.randint(2, 4)
        colours = rng.sample(sorted(COLOURS), count)
        shapes: list[Shape] = []
        for colour in colours:
            size = rng.choice(sorted(SIZES))
            lo, hi = SIZES[size]
            side = max(4, round(rng.uniform(lo, hi) * image_size))
            for _ in range(200):
                x = rng.randint(1, image_size - side - 1)
                y = rng.randint(1, image_size - side - 1)
                if all(_apart((x, y, side, side), s.box) for s in shapes):
                    shapes.append(Shape(rng.choice(SHAPES), colour, size, (x, y, side, side)))
                    break
            else:
                break  # no room: draw the whole scene again
        if len(shapes) == count:
            return shapes


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax + aw + GAP <= bx or bx + bw + GAP <= ax or ay + ah + GAP <= by or by + bh + GAP <= ay


def draw_shapes(shapes: list[Shape], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x, y, w, h = s.box
        x2, y2 = x + w - 1, y + h - 1  # PIL's coordinates are inclusive
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([x, y, x2, y2], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x, y, x2, y2], fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(x + (w - 1) / 2, y), (x2, y2), (x, y2)], fill=fill)
        else:  # diamond
            draw.polygon(
                [(x + (w - 1) / 2, y), (x2, y + (h - 1) / 2), (x + (w - 1) / 2, y2), (x, y + (h - 1) / 2)], fill=fill
            )
    return image


def noun_phrase(article: str, shape: Shape, colour: str, with_size: bool) -> str:
    words = ([shape.size] if with_size else []) + [colour, shape.kind]
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join([article, *words])


def render_caption(template: str, a: str, rel: str, b: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Fill a template; return the text and the character spans of the two noun phrases."""
    head, rest = template.split("{a}")
    middle, tail = rest.split("{b}")
    middle = middle.replace("{rel}", rel)
    start_a = len(head)
    start_b = start_a + len(a) + len(middle)
    text = head + a + middle + b + tail
    return text, (start_a, start_a + len(a)), (start_b, start_b + len(b))


def make_captions(rng: random.Random, shapes: list[Shape]) -> tuple[list[str], list[dict], list[list]]:
    """2-3 distinct true captions, each with two phrase links and one hard negative [index, text, kind]."""
    pairs = [(i, j) for i in range(len(shapes)) for j in range(len(shapes)) if i != j]
    captions: list[str] = []
    phrases: list[dict[str, Any]] = []
    negatives: list[list[Any]] = []
    wanted = rng.randint(2, 3)
    for _ in range(100):
        if len(captions) == wanted:
            break
        i, j = rng.choice(pairs)
        a, b = shapes[i], shapes[j]
        rel = rng.choice(a.relations_to(b))  # never empty: shapes are apart
        template = rng.choice(TEMPLATES)
        article = "the" if "is {rel}" in template else "a"
        size_a, size_b = rng.random() < 0.6, rng.random() < 0.6
        text, span_a, span_b = render_caption(
            template, noun_phrase(article, a, a.colour, size_a), rel, noun_phrase(article, b, b.colour, size_b)
        )
        if text in captions:
            continue
        if rng.random() < 0.5:
            kind = "relation"
            negative, _, _ = render_caption(
                template,
                noun_phrase(article, a, a.colour, size_a),
                RELATIONS[rel],
                noun_phrase(article, b, b.colour, size_b),
            )
        else:  # colour swap between the two phrases
            kind = "attribute"
            negative, _, _ = render_caption(
                template, noun_phrase(article, a, b.colour, size_a), rel, noun_phrase(article, b, a.colour, size_b)
            )
        index = len(captions)
        captions.append(text)
        phrases += [
            {"caption": index, "span": list(span_a), "boxes": [i]},
            {"caption": index, "span": list(span_b), "boxes": [j]},
        ]
        negatives.append([index, negative, kind])
    return captions, phrases, negatives


def render_scene(seed: int, index: int, image_size: int = 64) -> Scene:
    """The scene number `index` of the dataset generated from `seed`, as PNG bytes plus metadata."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")
    rng = scene_rng(seed, index)
    shapes = place_shapes(rng, image_size)
    captions, phrases, negatives = make_captions(rng, shapes)
    out = io.BytesIO()
    draw_shapes(shapes, image_size).save(out, format="PNG", optimize=False, compress_level=6)
    return Scene(out.getvalue(), image_size, image_size, shapes, captions, phrases, negatives)
