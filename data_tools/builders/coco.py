"""COCO layout: images/<split>/ + annotations/captions_<split>.json (+ instances_<split>.json boxes).

`build coco ROOT --split train2017`: COCO's own layout (images/<split>/, annotations/captions_<split>.json,
optional annotations/instances_<split>.json for boxes); one sample per image with all its captions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data_tools.build import Source, read_json_file, require_dir
from data_tools.errors import BadSample, UserError
from data_tools.records import Record, inside_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="COCO folder with images/ and annotations/")
    parser.add_argument("--split", default="train2017", help="which split to read (train2017, val2017, ...)")
    parser.add_argument("--images", default=None, help="images folder (default ROOT/images/SPLIT)")
    parser.add_argument("--captions", default=None, help="captions json (default ROOT/annotations/captions_SPLIT.json)")
    parser.add_argument(
        "--instances",
        default=None,
        help="instances json for boxes (default ROOT/annotations/instances_SPLIT.json if present)",
    )
    parser.add_argument("--no-boxes", action="store_true", help="ignore instance boxes")


def _list_of_dicts(data: Any, field: str, flag: str, path: str) -> list[dict]:
    value = data.get(field) if isinstance(data, dict) else None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UserError(f"{flag} {path}: not a COCO annotation file (no '{field}' list)")
    return value


def _key(image_id: Any) -> str:
    """Zero-padded COCO id (sorts numerically); other ids as text without dots."""
    return f"{image_id:012d}" if isinstance(image_id, int) else str(image_id).replace(".", "_")


def make_source(args: argparse.Namespace) -> Source:
    root = Path(args.root)
    if args.images is None or args.captions is None:
        require_dir(root, "coco ROOT")
    images_dir = require_dir(args.images or root / "images" / args.split, "--images")
    captions_path = args.captions or root / "annotations" / f"captions_{args.split}.json"
    captions_json = read_json_file(captions_path, "--captions")
    images = _list_of_dicts(captions_json, "images", "--captions", captions_path)
    annotations = _list_of_dicts(captions_json, "annotations", "--captions", captions_path)

    instances_path = args.instances or root / "annotations" / f"instances_{args.split}.json"
    boxes: dict[Any, list[tuple[int, list, str]]] = {}
    use_boxes = not args.no_boxes and (args.instances is not None or Path(instances_path).is_file())
    if use_boxes:
        instances = read_json_file(instances_path, "--instances")
        categories = {
            c.get("id"): c.get("name", "")
            for c in _list_of_dicts(instances, "categories", "--instances", instances_path)
        }
        for a in _list_of_dicts(instances, "annotations", "--instances", instances_path):
            boxes.setdefault(a.get("image_id"), []).append(
                (a.get("id", 0), a.get("bbox"), categories.get(a.get("category_id"), ""))
            )

    captions: dict[Any, list[tuple[int, Any]]] = {}
    for a in annotations:
        captions.setdefault(a.get("image_id"), []).append((a.get("id", 0), a.get("caption")))

    def records():
        for key, image in sorted(((_key(im.get("id")), im) for im in images), key=lambda t: t[0]):
            image_id, file_name = image.get("id"), image.get("file_name")
            path, error = None, None
            if not isinstance(file_name, str):
                error = ("bad_metadata", f"image {image_id}: no file_name")
            else:
                try:
                    path = str(inside_folder(images_dir, file_name))
                except BadSample as bad:
                    error = (bad.reason, f"image {image_id}: {bad.detail}")
            record = Record(
                key=key,
                origin=path or f"{captions_path}: image {image_id}",
                image_path=path,
                image_id=str(image_id),
                split=args.split,
                error=error,
                captions=[c for _, c in sorted(captions.get(image_id, []), key=lambda t: t[0])],
                extra={"coco_id": image_id, "file_name": file_name},
            )
            image_boxes = sorted(boxes.get(image_id, []), key=lambda t: t[0])
            if image_boxes:
                record.boxes = [b for _, b, _ in image_boxes]
                record.extra["box_labels"] = [label for _, _, label in image_boxes]
            yield record

    arguments = {
        "root": str(args.root),
        "split": args.split,
        "images": str(images_dir),
        "captions": str(captions_path),
        "instances": str(instances_path) if use_boxes else None,
    }
    return Source("coco", arguments, records)
