"""An evaluation set in memory: every image of a dataset once, every caption of it, the hard
negatives, ready for gallery scoring, relation sensitivity and ISD/ISDa.

Why not the training loader: evaluation needs all captions of an image (the loader picks one per
epoch), the gallery in stored order (so "ties by gallery order" means the same on every rank), and
the eval transform (resize + centre crop, no randomness). The samples are read in dataset.json's
shard order through `data_tools.shard_reader`, decoded by `data_tools.decode`, transformed by
`data_tools.transforms` and batched by `data_tools.collate`: the same code paths as training.

Gallery: images in stored order; captions image by image in their stored order, so
`caption_image` is non-decreasing. Samples sharing an `image_id` are one gallery image (the first
sample's pixels); the later samples' captions join it without phrase links (their boxes belong to
another stored image). Unreadable samples are skipped and counted in `bad_samples`.

Negatives in a sample's json (`negatives`), each one of `[caption index, "text"]`,
`[caption index, "text", "kind"]` or `{"caption": i, "text": "...", "kind": "..."}`; kind
defaults to "unknown". A malformed entry makes the sample bad (bad_metadata), as in training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools import schema
from data_tools.collate import collate
from data_tools.decode import decode_sample, parse_meta
from data_tools.errors import BadSample, ExitCode, UserError
from data_tools.images import DEFAULT_MAX_PIXELS
from data_tools.shard_reader import ShardReader, open_datasets
from data_tools.trust import Trust
from data_tools.synthetic import shapes_from_metadata, truth_table
from data_tools.transforms import centre_crop_box, crop_boxes, relink_phrases, transform_sample

UNKNOWN_KIND = "unknown"


@dataclasses.dataclass
class Triple:
    """One relation-sensitivity question: does `image` score `caption` above `negative`?"""

    image: int  # index into the image list it comes with
    caption: str
    negative: str
    kind: str = UNKNOWN_KIND


@dataclasses.dataclass
class EvalSet:
    """Images (transformed sample dicts, collate-ready) and captions of one dataset."""

    name: str
    images: list[dict[str, Any]]
    captions: list[str]
    caption_image: torch.Tensor  # [C] long, non-decreasing
    caption_phrases: list[list[dict] | None]  # per caption: phrase links into its image's boxes, or None
    triples: list[Triple]
    bad_samples: dict[str, int]
    caption_truth: torch.Tensor | None = None
    """[images, captions] bool: every caption true of every image, where the dataset lets that be decided
    (synthetic scenes: `data_tools.synthetic.caption_holds` against each image's shapes); None elsewhere.
    Always true on an image's own captions."""

    def pair_sample(self, caption: int) -> dict[str, Any]:
        """The matched (image, caption) pair as a collate sample (for ISD, ISDa and plots)."""
        image = self.images[int(self.caption_image[caption])]
        return dict(
            image,
            caption=self.captions[caption],
            phrases=self.caption_phrases[caption],
            negative=None,
            caption_index=caption,
        )


def parse_negatives(entries: Any, key: str) -> list[tuple[int, str, str]]:
    """The json `negatives` field -> [(caption index, text, kind)] (BadSample on a malformed entry)."""
    out = []
    for entry in entries or []:
        try:
            if isinstance(entry, dict):
                index, text, kind = entry["caption"], entry["text"], entry.get("kind", UNKNOWN_KIND)
            elif isinstance(entry, (list, tuple)) and len(entry) in (2, 3):
                index, text = entry[0], entry[1]
                kind = entry[2] if len(entry) == 3 else UNKNOWN_KIND
            else:
                raise ValueError(f"{entry!r} is not [i, text], [i, text, kind] or {{caption, text, kind}}")
            if (
                isinstance(index, bool)
                or not isinstance(index, int)
                or not isinstance(text, str)
                or not isinstance(kind, str)
            ):
                raise ValueError(f"{entry!r}: caption index must be an integer, text and kind strings")
        except (KeyError, ValueError, TypeError) as err:
            raise BadSample("bad_metadata", f"{key}: negatives: {err}") from None
        out.append((index, text, kind or UNKNOWN_KIND))
    return out


def _phrases_of(meta: dict[str, Any], caption: int, boxes: int) -> list[dict] | None:
    if meta.get("phrases") is None:
        return None
    out = []
    for p in meta["phrases"]:
        try:
            if int(p.get("caption", 0)) == caption:
                links = [int(b) for b in p["boxes"]]
                if any(b < 0 or b >= boxes for b in links):
                    raise ValueError(f"box index out of range in {links}")
                out.append({"span": [int(p["span"][0]), int(p["span"][1])], "boxes": links})
        except (TypeError, KeyError, ValueError, IndexError, AttributeError) as err:
            raise BadSample("bad_metadata", f"phrases: {err}") from None
    return out


def transform_image(sample: dict[str, Any], image_size: int) -> tuple[dict[str, Any], np.ndarray | None]:
    """Eval transform of a decoded sample (phrases left out) -> (collate sample, kept box indices)."""
    out = transform_sample(
        dict(sample, phrases=None),
        image_size=image_size,
        train=False,
        crop_scale=(1.0, 1.0),
        flip=False,
        seed=0,
        epoch=0,
    )
    kept = None
    if sample["boxes"] is not None:
        if sample["image"] is not None:
            height, width = sample["image"].shape[:2]
            _, kept = crop_boxes(sample["boxes"], centre_crop_box(width, height), image_size, False)
        else:
            kept = np.arange(len(sample["boxes"]))
    out.update(image=None, repeat=0, negative=None, phrases=None)
    return out, kept


def read_eval_set(
    path: str | Path,
    *,
    image_size: int,
    visual: str = "pixels",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    trust: Trust | None = None,
) -> EvalSet:
    """Every readable sample of the dataset folder `path` (at most `limit` images); `trust`: the
    user's opt-ins for `pipe:` and URL shard locations (data_tools.trust; default none).

    UserError (exit 3) when no sample has a caption to evaluate, or a location is not allowed.
    """
    ref = open_datasets([str(path)], trust=trust)[0]
    reader = ShardReader(ref.locations)
    images: list[dict[str, Any]] = []
    captions: list[str] = []
    caption_image: list[int] = []
    caption_phrases: list[list[dict] | None] = []
    triples: list[Triple] = []
    bad: dict[str, int] = {}
    by_image_id: dict[str, int] = {}
    scenes: list[list | None] = []  # per gallery image: its synthetic shapes, None when not a scene
    try:
        for shard, count in enumerate(ref.source.shard_samples):
            for index in range(count):
                if limit is not None and len(images) >= limit:
                    break
                try:
                    raw = reader.fetch(shard, index)
                    meta = parse_meta(raw)
                    negatives = parse_negatives(meta.get("negatives"), raw["__key__"])
                    if meta.get("negatives") is not None:  # parsed here, in every accepted form
                        original = json.loads(raw[schema.META_EXTENSION])
                        original.pop("negatives")
                        raw = dict(raw, **{schema.META_EXTENSION: json.dumps(original).encode()})
                    sample = decode_sample(raw, seed=0, epoch=0, max_pixels=max_pixels, visual=visual)
                    texts = meta.get("captions") or [sample["caption"]]
                    usable = [i for i, c in enumerate(texts) if c.strip()]
                    box_count = 0 if sample["boxes"] is None else len(sample["boxes"])
                    phrases = {i: _phrases_of(meta, i, box_count) for i in usable}
                    image, kept = transform_image(sample, image_size)
                except BadSample as err:
                    bad[err.reason] = bad.get(err.reason, 0) + 1
                    continue
                first = by_image_id.get(image["image_id"])
                if first is None:
                    first = by_image_id[image["image_id"]] = len(images)
                    images.append(image)
                    scenes.append(shapes_from_metadata(meta))
                numbering = {}
                for i in usable:
                    numbering[i] = len(captions)
                    captions.append(texts[i])
                    caption_image.append(first)
                    links = (
                        phrases[i] if images[first] is image else None
                    )  # a merged sample's boxes are not the gallery image's
                    caption_phrases.append(
                        relink_phrases(links, kept) if links is not None and kept is not None else None
                    )
                for i, text, kind in negatives:
                    if i in numbering and text.strip():
                        triples.append(Triple(first, texts[i], text, kind))
    finally:
        reader.close()
    if not captions:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or "no samples"
        raise UserError(f"{path}: no sample with a caption to evaluate ({detail})", ExitCode.DATA)
    order = torch.tensor(caption_image, dtype=torch.long)
    return EvalSet(
        Path(path).name, images, captions, order, caption_phrases, triples, bad, caption_truth(captions, order, scenes)
    )


def caption_truth(captions: list[str], caption_image: torch.Tensor, scenes: list[list | None]) -> torch.Tensor | None:
    """[images, captions] bool: which captions are true of which images, when every gallery image is a
    synthetic scene and every caption is of the scenes' grammar; None otherwise (no partial truth)."""
    if not scenes or any(shapes is None for shapes in scenes):
        return None
    table = truth_table(captions, scenes)
    if table is None:
        return None
    truth = torch.from_numpy(table)
    truth[caption_image, torch.arange(len(captions))] = True  # own captions count whatever the grammar says
    return truth


def collate_samples(
    samples: list[dict[str, Any]], tokenizer, max_text_len: int, visual: str, image_size: int
) -> dict[str, Any]:
    """Eval batch from collate samples (no MLM masking: probability 0)."""
    return collate(
        samples,
        tokenizer=tokenizer,
        max_text_len=max_text_len,
        mlm_probability=0.0,
        seed=0,
        epoch=0,
        visual=visual,
        image_size=image_size,
    )
