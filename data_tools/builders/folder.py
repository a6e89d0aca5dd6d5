"""A folder of name.jpg + name.txt pairs (searched recursively).

`build folder DIR`: images beside captions, `name.jpg` + `name.txt` (one caption per non-empty
line), searched recursively; an image without a caption file or a caption without an image is
rejected and listed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data_tools.build import Source, require_dir
from data_tools.errors import BadSample
from data_tools.records import MAX_TEXT_FILE_BYTES, Record, read_input_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder of name.jpg + name.txt pairs (searched recursively)")
    parser.add_argument("--split", default="", help="split label stored in every sample")


def list_pairs(root: Path) -> list[tuple[str, Path | None, Path | None]]:
    """(stem relative to root, image, caption file) per stem, in sorted order."""
    images: dict[str, Path] = {}
    texts: dict[str, Path] = {}
    extra: list[tuple[str, Path]] = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            stem = path.relative_to(root).with_suffix("").as_posix()
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if stem in images:
                    extra.append((stem, path))  # a.jpg and a.png: both kept, the second one separately
                else:
                    images[stem] = path
            elif path.suffix.lower() == ".txt":
                texts[stem] = path
    pairs = [(stem, images.get(stem), texts.get(stem)) for stem in sorted(set(images) | set(texts))]
    pairs += [(stem, path, texts.get(stem)) for stem, path in extra]
    return sorted(pairs, key=lambda p: (p[0], str(p[1])))


def read_captions(path: Path | None) -> tuple[list[str], tuple[str, str] | None]:
    """Non-empty lines of a caption file, or the BadSample reason that rejects the sample."""
    if path is None:
        return [], None  # no caption file: rejected later as empty_caption
    try:
        text = read_input_file(path, MAX_TEXT_FILE_BYTES, "empty_caption").decode("utf-8")
    except UnicodeDecodeError:
        return [], ("bad_utf8", str(path))
    except BadSample as bad:
        return [], (bad.reason, bad.detail)
    return [line.strip() for line in text.splitlines() if line.strip()], None


def make_source(args: argparse.Namespace) -> Source:
    root = require_dir(args.folder, "folder")
    pairs = list_pairs(root)
    width = max(9, len(str(len(pairs))))

    def records():
        for i, (stem, image, text) in enumerate(pairs):
            captions, error = read_captions(text)
            yield Record(
                key=f"{i:0{width}d}",
                origin=str(image or text),
                image_path=None if image is None else str(image),
                image_id=stem,
                captions=captions,
                split=args.split,
                error=error,
            )

    return Source("folder", {"folder": str(root), "split": args.split}, records)
