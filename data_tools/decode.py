"""Tar members of one sample -> a sample dict, safely (DESIGN.md 3 "Shard samples").

Why: every byte in a shard is untrusted. Images go through PIL with a pixel limit; JSON and text
must be UTF-8; `.npy` features load with `allow_pickle=False`; members that would need unpickling
(schema.REFUSED_EXTENSIONS) are never loaded: the sample is refused and counted. Any problem raises
BadSample with one of errors.BAD_SAMPLE_REASONS, which the loader counts and skips.

The decoded sample (consumed by transforms and collate):
  key, image_id, repeat      str, str, int
  image                      uint8 RGB pixels [H, W, 3] (visual="pixels"), else None
  caption, caption_index     the caption chosen for this epoch (seeded by seed, epoch, key)
  boxes                      float32 [k, 4] x, y, w, h in stored-image pixels, or None
  box_labels                 [k] category names of the boxes (json `box_labels`), or None
  phrases                    [{"span": [start, end], "boxes": [i, ...]}] of the chosen caption, or None
  negative                   the chosen caption's hard negative, or None
  negative_kind              its kind from the json's [index, text, kind] (e.g. relation), or None
  feats, pos                 float32 [m, D], [m, 7] precomputed features (visual="features"), else None
  image_hw                   (height, width) of the stored image from the json (visual="features", when
                             the json has both), else None: the pixels `boxes` and region boxes refer to

The json fields read here are the schema's metadata fields (all optional): image_id, captions, width,
height, boxes, box_labels, phrases, negatives; source and split are written for people and not read.
Others (img2dataset's url, status, ...) stay in the shard and are ignored.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

from data_tools import schema
from data_tools.errors import BadSample
from data_tools.images import DEFAULT_MAX_PIXELS, decode_pixels
from data_tools.order import sample_seed


def refuse_pickles(raw: dict[str, Any]) -> None:
    """Refuse a sample carrying a member that only unpickling could read (never loaded)."""
    for ext in raw:
        if not ext.startswith("__") and ext.rsplit(".", 1)[-1].lower() in schema.REFUSED_EXTENSIONS:
            raise BadSample("refused_member", f"{raw.get('__key__')}.{ext}")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample("bad_utf8", f"{what}: {err}") from None


def parse_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The json member as a dict with its known fields type-checked; unknown fields kept as they are."""
    if schema.META_EXTENSION not in raw:
        return {}
    try:
        meta = json.loads(_text(raw[schema.META_EXTENSION], "json"))
    except json.JSONDecodeError as err:
        raise BadSample("bad_metadata", f"json: {err}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_metadata", "json is not an object")
    caps = meta.get("captions")
    if caps is not None and not (isinstance(caps, list) and all(isinstance(c, str) for c in caps)):
        raise BadSample("bad_metadata", "captions must be a list of strings")
    boxes = meta.get("boxes")
    if boxes is not None:
        try:
            arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if len(boxes) else np.zeros((0, 4), np.float32)
            if arr.shape[0] != len(boxes) or not np.isfinite(arr).all():
                raise ValueError("not k x 4")
        except (TypeError, ValueError) as err:
            raise BadSample("bad_metadata", f"boxes must be [[x, y, w, h], ...]: {err}") from None
        meta["boxes"] = arr
    labels = meta.get("box_labels")
    if labels is not None and not (
        isinstance(labels, list)
        and all(isinstance(x, str) for x in labels)
        and boxes is not None
        and len(labels) == len(meta["boxes"])
    ):
        raise BadSample("bad_metadata", "box_labels must be a list of strings, one per box")
    for field in ("phrases", "negatives"):
        if meta.get(field) is not None and not isinstance(meta[field], list):
            raise BadSample("bad_metadata", f"{field} must be a list")
    return meta


def stored_image_hw(meta: dict[str, Any], key: str) -> tuple[int, int] | None:
    """(height, width) from the json's `width`/`height`, or None when it has neither.

    Why: feature samples carry no image, yet ISDa must scale their normalised region geometry to
    the pixels their annotated boxes are in; the stored image's size is that scale.
    """
    width, height = meta.get("width"), meta.get("height")
    if width is None and height is None:
        return None

    def positive_int(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and float(v).is_integer()

    if not (positive_int(width) and positive_int(height)):
        raise BadSample(
            "bad_metadata", f"{key}: width and height must be positive integers, got {width!r} and {height!r}"
        )
    return int(height), int(width)


def _image_member(raw: dict[str, Any]) -> bytes | None:
    for ext in schema.IMAGE_EXTENSIONS:
        if ext in raw:
            return raw[ext]
    return None


def _npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
    except Exception as err:  # not an npy, or an object array that would need pickle
        raise BadSample("bad_metadata", f"{what}: {type(err).__name__}: {err}") from None


def choose(n: int, seed: int) -> int:
    """A uniform choice among n, from a torch generator (same draw on every platform). One option
    needs no generator (a fresh one per call: nothing else's draws move)."""
    if n == 1:
        return 0
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(n, (1,), generator=g))


def decode_sample(
    raw: dict[str, Any], *, seed: int, epoch: int, max_pixels: int = DEFAULT_MAX_PIXELS, visual: str = "pixels"
) -> dict[str, Any]:
    """One raw sample (member extension -> bytes, plus `__key__`) -> the decoded sample above.

    visual="pixels" needs and decodes the image (features are not loaded); visual="features" needs
    feat.npy and pos.npy and leaves the image undecoded.
    """
    key, repeat = raw["__key__"], int(raw.get("__repeat__", 0))
    refuse_pickles(raw)
    meta = parse_meta(raw)

    captions = meta.get("captions")
    if not captions and schema.TEXT_EXTENSION in raw:
        captions = [_text(raw[schema.TEXT_EXTENSION], "txt")]
    usable = [i for i, c in enumerate(captions or []) if c.strip()]
    if not usable:
        raise BadSample("empty_caption", key)
    caption_index = usable[choose(len(usable), sample_seed(seed, epoch, key, "caption", repeat))]
    caption = captions[caption_index]

    feats = pos = image = image_hw = None
    if visual == "features":
        image_hw = stored_image_hw(meta, key)
        if schema.FEATURE_EXTENSION not in raw or schema.GEOMETRY_EXTENSION not in raw:
            raise BadSample("missing_image", f"{key}: no {schema.FEATURE_EXTENSION} and {schema.GEOMETRY_EXTENSION}")
        feats = _npy(raw[schema.FEATURE_EXTENSION], schema.FEATURE_EXTENSION)
        pos = _npy(raw[schema.GEOMETRY_EXTENSION], schema.GEOMETRY_EXTENSION)
        if feats.ndim != 2 or pos.shape != (feats.shape[0], 7):
            raise BadSample(
                "bad_metadata",
                f"{key}: feat.npy {feats.shape} needs pos.npy of shape ({feats.shape[0]}, 7), got {pos.shape}",
            )
    else:
        image_bytes = _image_member(raw)
        if image_bytes is None:
            raise BadSample("missing_image", key)
        image = decode_pixels(image_bytes, max_pixels)

    boxes = meta.get("boxes")
    phrases = None
    if meta.get("phrases") is not None:
        phrases = []
        for p in meta["phrases"]:
            try:
                if int(p.get("caption", 0)) == caption_index:
                    span = [int(p["span"][0]), int(p["span"][1])]
                    links = [int(b) for b in p["boxes"]]
                    if boxes is None or any(b < 0 or b >= len(boxes) for b in links):
                        raise ValueError(f"box index out of range in {links}")
                    phrases.append({"span": span, "boxes": links})
            except (TypeError, KeyError, ValueError, IndexError, AttributeError) as err:
                raise BadSample("bad_metadata", f"phrases: {err}") from None
    negative = negative_kind = None
    if meta.get("negatives"):
        try:
            # [caption index, text] or [caption index, text, kind] (kind: e.g. "relation", "attribute")
            mine = [
                (str(n[1]), str(n[2]) if len(n) > 2 else None) for n in meta["negatives"] if int(n[0]) == caption_index
            ]
        except (TypeError, ValueError, IndexError, KeyError) as err:
            raise BadSample("bad_metadata", f"negatives: {err}") from None
        if mine:
            negative, negative_kind = mine[choose(len(mine), sample_seed(seed, epoch, key, "negative", repeat))]
    return {
        "key": key,
        "image_id": str(meta.get("image_id", key)),
        "repeat": repeat,
        "image": image,
        "caption": caption,
        "caption_index": caption_index,
        "boxes": boxes,
        "box_labels": meta.get("box_labels"),
        "phrases": phrases,
        "negative": negative,
        "negative_kind": negative_kind,
        "feats": feats,
        "pos": pos,
        "image_hw": image_hw,
    }
