"""Karpathy split files (dataset_coco.json, dataset_flickr30k.json, ...) + an images folder.

`build karpathy dataset_coco.json --images DIR --split train`: Karpathy's split files
(dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json); one sample per image with its
sentences, filtered by split (train, val, test, restval, comma-separated, or all)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data_tools.build import Source, read_json_file, require_dir
from data_tools.errors import BadSample, UserError
from data_tools.records import Record, inside_folder

SPLITS = ("train", "val", "test", "restval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("json", help="Karpathy split file, e.g. dataset_coco.json")
    parser.add_argument(
        "--images", required=True, help="images folder (COCO: the folder holding train2014/ and val2014/)"
    )
    parser.add_argument(
        "--split", default="train", help="train, val, test, restval, a comma list (train,restval) or all"
    )


def parse_splits(text: str) -> tuple[str, ...]:
    splits = SPLITS if text == "all" else tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"--split {text}: expected one or more of {', '.join(SPLITS)} (comma-separated) or all")
    return splits


def image_path(images: Path, entry: dict[str, Any]) -> Path:
    """COCO entries carry `filepath` (train2014/val2014); Flickr ones only `filename`. BadSample
    when the names lead outside the images folder (records.inside_folder)."""
    name = str(entry.get("filename"))
    flat = inside_folder(images, name)
    if entry.get("filepath"):
        nested = inside_folder(images, f"{entry['filepath']}/{name}")
        if nested.is_file() or not flat.is_file():
            return nested
    return flat


def sentence_text(sentence: Any) -> Any:
    if not isinstance(sentence, dict):
        return None
    raw = sentence.get("raw")
    if isinstance(raw, str):
        return raw.strip()
    tokens = sentence.get("tokens")
    return " ".join(map(str, tokens)) if isinstance(tokens, list) else None


def make_source(args: argparse.Namespace) -> Source:
    splits = parse_splits(args.split)
    data = read_json_file(args.json, "karpathy")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise UserError(f"karpathy {args.json}: not a Karpathy split file (no 'images' list)")
    images = require_dir(args.images, "--images")
    dataset = str(data.get("dataset", ""))

    def records():
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict):
                yield Record(
                    key=f"entry{n:09d}", origin=f"{args.json}: images[{n}]", error=("bad_metadata", "not an object")
                )
                continue
            if entry.get("split") not in splits:
                continue
            imgid = entry.get("imgid", n)
            try:
                path, error = str(image_path(images, entry)), None
            except BadSample as bad:
                path, error = None, (bad.reason, bad.detail)
            image_id = entry.get("cocoid", Path(str(entry.get("filename"))).stem)
            sentences = entry.get("sentences") if isinstance(entry.get("sentences"), list) else []
            yield Record(
                key=f"{imgid:09d}" if isinstance(imgid, int) else str(imgid).replace(".", "_"),
                origin=path or f"{args.json}: images[{n}]",
                image_path=path,
                image_id=str(image_id),
                split=entry["split"],
                error=error,
                captions=[sentence_text(s) for s in sentences],
                extra={
                    "karpathy_dataset": dataset,
                    "sentids": [s.get("sentid") for s in sentences if isinstance(s, dict)],
                },
            )

    arguments = {"json": str(args.json), "images": str(images), "split": ",".join(splits)}
    return Source("karpathy", arguments, records)
