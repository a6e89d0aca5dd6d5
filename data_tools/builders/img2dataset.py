"""Index an existing img2dataset output folder in place (its tars are not rewritten).

`build img2dataset DIR --out OUT`: index an existing img2dataset output (00000.tar, ... with
<key>.jpg/.txt/.json members) without rewriting its tars: dataset.json lists where they are and
manifest.parquet gives every sample's member offsets.

The tars stay as they are, so nothing can be removed from them: a sample found bad while indexing
is still counted in its shard (the loader's positions count every stored sample) and is listed in
rejected.jsonl and the rejected counts; the loader skips it when it meets it. For the same reason
identical images are not merged and --resize is refused. A key that one tar holds twice is listed
as `duplicate_key` for its second copy, which every reading path skips (data_tools.shard_reader).

This module hands the driver the existing tars and `index_shard`, its shard step
(`Source.existing`, `Source.make_shard`): the driver knows no format.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from data_tools import images
from data_tools.build import ShardJob, Source, require_dir
from data_tools.errors import BadSample, UserError
from data_tools.records import clean_captions
from data_tools.schema import IMAGE_EXTENSIONS, REFUSED_EXTENSIONS
from data_tools.shard_reader import sample_members
from data_tools.writer import file_sha256
from data_tools.trust import location_kind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="img2dataset output folder (its *.tar files are indexed in name order)")
    parser.add_argument("--split", default="", help="split label for samples whose json has none")


def shard_location(tar: Path, out: Path) -> str:
    """Relative to the dataset folder when the tar lies inside it, else absolute; always a location
    the readers take for a file path (a tar named `pipe:...` is `./pipe:...`, not a command)."""
    tar, out = tar.resolve(), out.resolve()
    location = os.path.relpath(tar, out) if out in tar.parents else str(tar)
    return location if location_kind(location) == "path" else f"./{location}"


def check_sample(read, members: dict[str, tuple[int, int]], max_pixels: int, split: str) -> dict[str, Any]:
    """Manifest fields of one stored sample; BadSample when the loader would reject it."""
    refused = [e for e in members if e.rsplit(".", 1)[-1] in REFUSED_EXTENSIONS]
    if refused:
        raise BadSample("refused_member", ", ".join(refused))
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise BadSample("missing_image")
    data = read(members[ext])
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(read(members["json"]).decode("utf-8"))
        except UnicodeDecodeError:
            raise BadSample("bad_utf8", "json member") from None
        except ValueError as err:
            raise BadSample("bad_metadata", str(err)) from None
        if not isinstance(meta, dict):
            raise BadSample("bad_metadata", "json member is not an object")
    captions = meta.get("captions") if isinstance(meta.get("captions"), list) else []
    texts, _ = clean_captions(([read(members["txt"])] if "txt" in members else []) + captions)
    image = images.decode_image(data, max_pixels)
    return {
        "image_id": str(meta.get("image_id") or meta.get("key") or ""),
        "num_captions": len(texts),
        "width": image.width,
        "height": image.height,
        "image_bytes": len(data),
        "content_hash": images.content_hash(data),
        "split": str(meta.get("split") or split),
    }


def index_shard(job: ShardJob) -> dict[str, Any]:
    """A shard-job state (see data_tools.build) for an existing tar: every sample gets a row."""
    path = job.existing if os.path.isabs(job.existing) else os.path.join(job.out, job.existing)
    rows, rejected, seen = [], [], set()
    with open(path, "rb") as f:

        def read(span: tuple[int, int]) -> bytes:
            f.seek(span[0])
            return f.read(span[1])

        for key, members in sample_members(path):
            fields = {
                "image_id": key,
                "num_captions": 0,
                "width": 0,
                "height": 0,
                "image_bytes": 0,
                "content_hash": "",
                "split": job.arguments["split"],
            }
            try:
                if key in seen:
                    raise BadSample("duplicate_key", key)
                fields.update(check_sample(read, members, job.options.max_pixels, job.arguments["split"]))
                fields["image_id"] = fields["image_id"] or key
            except BadSample as bad:
                rejected.append({"key": key, "source": f"{path}:{key}", "reason": bad.reason, "detail": bad.detail})
            seen.add(key)
            rows.append({"key": key, **fields, "members": {e: list(span) for e, span in members.items()}})
    return {
        "location": job.existing,
        "samples": len(rows),
        "size": os.path.getsize(path),
        "sha256": file_sha256(path),
        "rows": rows,
        "rejected": rejected,
    }


def make_source(args: argparse.Namespace) -> Source:
    folder = require_dir(args.folder, "img2dataset")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise UserError(f"img2dataset {folder}: no .tar files in this folder")
    out = Path(args.out)
    locations = [shard_location(t, out) for t in tars]
    arguments = {"folder": str(folder), "split": args.split}
    return Source("img2dataset", arguments, lambda: [], dedup=False, existing=locations, make_shard=index_shard)
