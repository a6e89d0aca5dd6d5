"""One input record -> what a shard stores: tar members and manifest fields (or BadSample).

The record type every format module fills in, and the validation every builder shares: the image
is read and fully decoded (optionally resized), captions are decoded and cleaned, annotations
(boxes, phrase links, negatives) are checked, re-indexed to the kept captions and scaled with the
image. Anything unusable raises BadSample with its reason; nothing here stops a build.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from data_tools import images
from data_tools.errors import BadSample


@dataclasses.dataclass
class Record:
    """One input sample as a source lists it; image bytes are read later, in a worker."""

    key: str
    """Unique, deterministic, dot-free (webdataset splits key and extension at the first dot)."""
    origin: str
    """Where it came from (a path), for rejected.jsonl."""
    captions: list[Any] = dataclasses.field(default_factory=list)
    """str, or raw bytes that the driver decodes (non-UTF-8 -> bad_utf8)."""
    image_path: str | None = None
    image_data: bytes | None = None
    scene: tuple[int, int, int] | None = None
    """Synthetic records: (seed, index, image size), rendered in the worker."""
    image_id: str | None = None
    split: str | None = None
    boxes: list[Any] = dataclasses.field(default_factory=list)
    phrases: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    negatives: list[list[Any]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """More metadata fields, kept in the sample json as they are."""
    error: tuple[str, str] | None = None
    """A BadSample reason found while listing (e.g. a malformed annotation file of this image)."""
    input_size: int = 0
    input_hash: str | None = None

    def absorb(self, other: "Record") -> None:
        """Merge an identical image's annotations into this record (indices shifted to stay valid)."""
        c, b = len(self.captions), len(self.boxes)
        self.captions = [*self.captions, *other.captions]
        self.boxes = [*self.boxes, *other.boxes]
        self.phrases = [
            *self.phrases,
            *({**p, "caption": p["caption"] + c, "boxes": [i + b for i in p["boxes"]]} for p in other.phrases),
        ]
        self.negatives = [*self.negatives, *([n[0] + c, *n[1:]] for n in other.negatives)]


def inside_folder(folder: str | os.PathLike, name: str) -> Path:
    """`folder / name` for a file name taken from input data (an annotation file, a table, a split
    list); BadSample("bad_metadata") when the name is absolute, climbs out with `..` or holds a NUL.

    Why: the user chose the folder, the annotation file's author chose the names; a build must not
    ingest files outside the folder it was given. The check is on the name, so links that the user
    placed inside the folder still work."""
    pure = PurePosixPath(name)
    if not name or "\0" in name or pure.is_absolute() or os.path.isabs(name) or ".." in pure.parts:
        raise BadSample("bad_metadata", f"file name {name!r} is outside {folder} (absolute or with ..)")
    return Path(folder) / pure


MAX_IMAGE_FILE_BYTES = 256 << 20
"""Input image files larger than this are rejected as `too_large` (read stops at one byte more)."""
MAX_TEXT_FILE_BYTES = 16 << 20
"""Caption and annotation side files larger than this are rejected the same way."""


def read_input_file(path: str | os.PathLike, max_bytes: int, missing: str) -> bytes:
    """The bytes of an input file, if it is a regular file (after following links) of at most
    `max_bytes`; else BadSample(`missing`) (absent, a folder, a FIFO, a device) or `too_large`.

    Why this way: a FIFO named x.jpg would block `open` forever and a link to /dev/zero would never
    end, so the file is opened without blocking, checked with fstat on the open descriptor (no race
    with a rename in between) and read at most max_bytes + 1 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadSample(missing, str(path)) from None
    except OSError as err:
        raise BadSample("decode_error", f"{path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadSample(missing, f"{path}: not a regular file")
        try:
            data = f.read(max_bytes + 1)
        except OSError as err:
            raise BadSample("decode_error", f"{path}: {err.strerror}") from None
    if len(data) > max_bytes:
        raise BadSample("too_large", f"{path}: more than {max_bytes} bytes")
    return data


def read_image_bytes(record: Record, max_bytes: int = MAX_IMAGE_FILE_BYTES) -> bytes:
    if record.image_data is not None:
        return record.image_data
    if record.image_path is None:
        raise BadSample("missing_image", "no image listed")
    return read_input_file(record.image_path, max_bytes, "missing_image")


def clean_captions(raw: list[Any]) -> tuple[list[str], list[int | None]]:
    """Decode, drop empty and repeated captions; return the texts and old index -> new index."""
    texts: list[str] = []
    mapping: list[int | None] = []
    bad_utf8 = False
    for caption in raw:
        if isinstance(caption, (bytes, bytearray)):
            try:
                caption = bytes(caption).decode("utf-8")
            except UnicodeDecodeError:
                bad_utf8 = True
                mapping.append(None)
                continue
        if not isinstance(caption, str) or not caption.strip() or caption in texts:
            mapping.append(texts.index(caption) if isinstance(caption, str) and caption in texts else None)
            continue
        mapping.append(len(texts))
        texts.append(caption)
    if not texts:
        raise BadSample("bad_utf8" if bad_utf8 else "empty_caption")
    return texts, mapping


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scale_annotations(record: Record, mapping: list[int | None], captions: list[str], scale: tuple[float, float]):
    """Boxes to stored pixels; phrases and negatives re-indexed to the kept captions; bad_metadata if malformed."""
    sx, sy = scale
    boxes = []
    for box in record.boxes:
        if not (
            isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_number, box)) and box[2] >= 0 and box[3] >= 0
        ):
            raise BadSample("bad_metadata", f"box {box!r} is not [x, y, w, h]")
        x, y, w, h = box
        boxes.append(
            [round(x * sx, 2), round(y * sy, 2), round(w * sx, 2), round(h * sy, 2)]
            if scale != (1.0, 1.0)
            else list(box)
        )
    phrases, seen = [], set()
    for p in record.phrases:
        try:
            old, (start, end), idx = p["caption"], p["span"], list(p["boxes"])
        except (KeyError, TypeError, ValueError):
            raise BadSample("bad_metadata", f"phrase {p!r}") from None
        if not (isinstance(old, int) and 0 <= old < len(mapping)) or not all(
            isinstance(i, int) and 0 <= i < len(boxes) for i in idx
        ):
            raise BadSample("bad_metadata", f"phrase {p!r} points outside the captions or boxes")
        new = mapping[old]
        if new is None or (new, start, end, tuple(idx)) in seen:
            continue  # its caption was dropped (or merged into an identical one)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(captions[new])):
            raise BadSample("bad_metadata", f"phrase span {[start, end]} outside caption {new}")
        seen.add((new, start, end, tuple(idx)))
        phrases.append({"caption": new, "span": [start, end], "boxes": idx})
    negatives = []
    for n in record.negatives:  # [caption index, text] or [caption index, text, kind]
        if not (
            isinstance(n, (list, tuple))
            and len(n) in (2, 3)
            and isinstance(n[0], int)
            and 0 <= n[0] < len(mapping)
            and all(isinstance(x, str) for x in n[1:])
        ):
            raise BadSample(
                "bad_metadata", f"negative {n!r} is not [caption index, text] or [caption index, text, kind]"
            )
        entry = [mapping[n[0]], *n[1:]]
        if mapping[n[0]] is not None and n[1].strip() and entry not in negatives:
            negatives.append(entry)
    return boxes, phrases, negatives


def process_record(
    record: Record, builder: str, *, max_pixels: int, resize: int | None, quality: int
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """One record -> (tar members, manifest fields); BadSample when it cannot be used. The image
    options are the build's (--max-pixels, --resize, --quality)."""
    if record.error is not None:
        raise BadSample(*record.error)
    if record.scene is not None:
        from data_tools.synthetic import render_scene

        scene = render_scene(*record.scene)
        record = dataclasses.replace(
            record,
            captions=scene.captions,
            boxes=scene.boxes,
            phrases=scene.phrases,
            negatives=scene.negatives,
            extra={**record.extra, "box_labels": scene.box_labels},
        )
        data = scene.image
    else:
        data = read_image_bytes(record)
    captions, mapping = clean_captions(record.captions)
    stored = images.prepare_image(data, max_pixels, resize, quality)
    boxes, phrases, negatives = scale_annotations(record, mapping, captions, stored.scale)
    meta: dict[str, Any] = {
        **record.extra,
        "image_id": record.image_id or record.key,
        "captions": captions,
        "width": stored.width,
        "height": stored.height,
        "source": builder,
        "split": record.split,
    }
    for name, value in (("boxes", boxes), ("phrases", phrases), ("negatives", negatives)):
        if value:
            meta[name] = value
    members = {
        stored.extension: stored.data,
        "txt": captions[0].encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
    }
    fields = {
        "image_id": meta["image_id"],
        "num_captions": len(captions),
        "width": stored.width,
        "height": stored.height,
        "image_bytes": len(stored.data),
        "content_hash": images.content_hash(stored.data),
        "split": record.split or "",
    }
    return members, fields
