"""Flickr30k Entities: Sentences/*.txt markup + Annotations/*.xml boxes -> phrase-to-box links.

`build flickr30k-entities ROOT --images DIR [--split train]`: Flickr30k Entities, i.e.
`Sentences/<id>.txt` (one caption per line with `[/EN#18/people A man]` markup) and
`Annotations/<id>.xml` (PASCAL-VOC-like boxes per entity id) -> captions, `boxes` and `phrases`
(character spans of each entity mention linked to all of its boxes). Mentions of entities without
a box (`nobndbox`, `scene`) keep their text but get no link."""

from __future__ import annotations

import argparse
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from data_tools.build import Source, require_dir, require_file
from data_tools.errors import BadSample
from data_tools.records import MAX_TEXT_FILE_BYTES, Record, inside_folder, read_input_file

MENTION = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)*)\s+([^\]]*)\]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="folder with Sentences/ and Annotations/ (and train.txt, val.txt, test.txt)")
    parser.add_argument("--images", default=None, help="Flickr30k images folder (default ROOT/images)")
    parser.add_argument("--split", default="all", help="train, val or test (ids from ROOT/<split>.txt), or all")


def parse_sentence(line: str) -> tuple[str, list[tuple[str, int, int]]]:
    """Markup -> (plain caption, [(entity id, start, end)]) with character offsets into the caption."""
    text, mentions, last = [], [], 0
    length = 0
    for match in MENTION.finditer(line):
        before = line[last : match.start()]
        text.append(before)
        length += len(before)
        phrase = match.group(3).strip()
        mentions.append((match.group(1), length, length + len(phrase)))
        text.append(phrase)
        length += len(phrase)
        last = match.end()
    text.append(line[last:])
    caption = "".join(text)
    lead = len(caption) - len(caption.lstrip())
    return caption.strip(), [(entity, start - lead, end - lead) for entity, start, end in mentions]


def parse_annotation(path: Path) -> tuple[list[list[float]], dict[str, list[int]]]:
    """Boxes [x, y, w, h] in XML order (a box shared by several entities listed once) and entity id -> box indices."""
    root = ET.parse(path).getroot()
    boxes: list[list[float]] = []
    entity_boxes: dict[str, list[int]] = {}
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        x1, y1, x2, y2 = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box {[x1, y1, x2, y2]} has negative size")
        xywh = [x1, y1, x2 - x1, y2 - y1]
        if xywh not in boxes:
            boxes.append(xywh)
        index = boxes.index(xywh)
        for name in obj.iter("name"):
            ids = entity_boxes.setdefault((name.text or "").strip(), [])
            if index not in ids:
                ids.append(index)
    return boxes, entity_boxes


def make_record(image_id: str, root: Path, images: Path, split: str) -> Record:
    try:  # ids come from the split file: none may lead out of the folders
        sentences_path = inside_folder(root / "Sentences", f"{image_id}.txt")
        annotation = inside_folder(root / "Annotations", f"{image_id}.xml")
        image = inside_folder(images, f"{image_id}.jpg")
    except BadSample as bad:
        return Record(
            key=image_id.replace(".", "_"),
            origin=f"{root}: id {image_id}",
            image_id=image_id,
            split=split,
            error=(bad.reason, bad.detail),
        )
    record = Record(
        key=image_id.replace(".", "_"), origin=str(image), image_path=str(image), image_id=image_id, split=split
    )
    try:
        lines = read_input_file(sentences_path, MAX_TEXT_FILE_BYTES, "empty_caption").decode("utf-8").splitlines()
    except UnicodeDecodeError:
        record.error = ("bad_utf8", str(sentences_path))
        return record
    except BadSample as bad:
        record.error = (bad.reason, bad.detail)
        return record
    boxes: list[list[float]] = []
    entity_boxes: dict[str, list[int]] = {}
    if annotation.is_file():
        try:
            boxes, entity_boxes = parse_annotation(annotation)
        except (ET.ParseError, ValueError, TypeError) as err:
            record.error = ("bad_metadata", f"{annotation}: {err}")
            return record
    captions: list[Any] = []
    phrases: list[dict[str, Any]] = []
    for line in lines:
        if not line.strip():
            continue
        caption, mentions = parse_sentence(line)
        index = len(captions)
        captions.append(caption)
        for entity, start, end in mentions:
            if entity_boxes.get(entity) and end > start:
                phrases.append({"caption": index, "span": [start, end], "boxes": list(entity_boxes[entity])})
    record.captions, record.boxes, record.phrases = captions, boxes, phrases
    return record


def make_source(args: argparse.Namespace) -> Source:
    root = require_dir(args.root, "flickr30k-entities ROOT")
    require_dir(root / "Sentences", "flickr30k-entities ROOT/Sentences")
    images = require_dir(args.images or root / "images", "--images")
    if args.split == "all":
        ids = sorted(p.stem for p in (root / "Sentences").glob("*.txt"))
    else:
        split_file = require_file(root / f"{args.split}.txt", "--split")
        ids = [
            line.strip()
            for line in split_file.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip()
        ]
    split = "" if args.split == "all" else args.split

    def records():
        for image_id in ids:
            yield make_record(image_id, root, images, split)

    arguments = {"root": str(root), "images": str(images), "split": args.split}
    return Source("flickr30k-entities", arguments, records)
