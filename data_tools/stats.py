"""`python -m data_tools stats DIR`: what a dataset holds: counts (samples, shards, bytes, captions,
splits, rejected by reason, samples with boxes / phrase links / negatives) and distributions of
caption length (words), image width, height and stored bytes.

Captions and annotations come from each sample's json member, read by the manifest's offsets
(`iter_metadata`), which the tokenizer trainer reuses to get every caption of a dataset.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_tools.manifest import load_dataset
from data_tools.shard_reader import member_key
from data_tools.trust import Trust, is_local


def iter_metadata(
    directory: str | os.PathLike, trust: Trust | None = None
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(manifest row, sample json with at least `captions`) for every sample, in dataset order.

    Samples without a json member (or whose json lacks captions) get the txt member as their caption.
    Local shards are read by seeking to the recorded offsets; remote ones are streamed (`pipe:` and
    URL locations only with the user's opt-in in `trust`: data_tools.trust, checked before any read).
    """
    root = Path(directory)
    info, table = load_dataset(root)
    locations = info.locations(root, trust)
    rows = table.to_pylist()
    by_shard: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        by_shard[row["shard"]].append(row)
    for index, location in enumerate(locations):
        if not is_local(location):
            yield from _stream_metadata(location, by_shard[index])
            continue
        with open(location, "rb") as f:
            for row in by_shard[index]:
                members = json.loads(row["members"])
                yield row, _metadata(lambda ext: _read(f, members[ext]) if ext in members else None)


def _read(f, span: list[int]) -> bytes:
    f.seek(span[0])
    return f.read(span[1])


def _metadata(read) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    raw = read("json")
    if raw is not None:
        try:
            loaded = json.loads(raw.decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:  # UnicodeDecodeError is a ValueError
            meta = {}
    if not isinstance(meta.get("captions"), list):
        txt = read("txt")
        meta["captions"] = [txt.decode("utf-8", errors="replace")] if txt is not None else []
    return meta


def _stream_metadata(location: str, rows: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    import tarfile

    from data_tools.remote import open_shard

    wanted = {row["key"]: row for row in rows}
    found: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    with open_shard(location) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, ext = member_key(member.name) or (None, None)
            if key in wanted and ext in ("json", "txt") and ext not in found[key]:  # a key's first copy, as the reader
                found[key][ext] = tar.extractfile(member).read()
    for row in rows:
        yield row, _metadata(found[row["key"]].get)


def distribution(values: list[float] | np.ndarray) -> dict[str, float]:
    """min, mean, percentiles and max of a list of numbers (zeros when empty)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {k: 0.0 for k in ("min", "mean", "p10", "p50", "p90", "p99", "max")}
    p10, p50, p90, p99 = np.percentile(array, [10, 50, 90, 99])
    return {
        "min": float(array.min()),
        "mean": round(float(array.mean()), 3),
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(array.max()),
    }


def compute_stats(directory: str | os.PathLike, trust: Trust | None = None) -> dict[str, Any]:
    info, table = load_dataset(directory)
    caption_words: list[int] = []
    counts = collections.Counter()
    for _, meta in iter_metadata(directory, trust):
        caption_words += [len(str(c).split()) for c in meta["captions"]]
        counts["with_boxes"] += bool(meta.get("boxes"))
        counts["with_phrases"] += bool(meta.get("phrases"))
        counts["with_negatives"] += bool(meta.get("negatives"))
        counts["boxes"] += len(meta.get("boxes") or [])
    splits = collections.Counter(table.column("split").to_pylist())
    return {
        "dataset": str(directory),
        "builder": info.builder,
        "samples": info.total_samples,
        "shards": len(info.shards),
        "bytes": sum(s.size for s in info.shards),
        "captions": len(caption_words),
        "splits": dict(sorted(splits.items())),
        "rejected": info.rejected,
        **{k: counts[k] for k in ("with_boxes", "boxes", "with_phrases", "with_negatives")},
        "caption_words": distribution(caption_words),
        "width": distribution(table.column("width").to_numpy()),
        "height": distribution(table.column("height").to_numpy()),
        "image_bytes": distribution(table.column("image_bytes").to_numpy()),
        "samples_per_shard": distribution([s.samples for s in info.shards]),
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"{stats['dataset']} ({stats['builder']}): {stats['samples']} samples in {stats['shards']} shards, "
        f"{stats['bytes'] / 1e6:.1f} MB, {stats['captions']} captions",
        f"splits: {', '.join(f'{k or chr(39) * 2}={v}' for k, v in stats['splits'].items())}",
        f"rejected: {', '.join(f'{k}={v}' for k, v in stats['rejected'].items()) or 'none'}",
        f"annotations: {stats['with_boxes']} samples with boxes ({stats['boxes']} boxes), "
        f"{stats['with_phrases']} with phrase links, {stats['with_negatives']} with hard negatives",
    ]
    for name in ("caption_words", "width", "height", "image_bytes", "samples_per_shard"):
        d = stats[name]
        lines.append(f"{name:>17}: " + "  ".join(f"{k} {v:g}" for k, v in d.items()))
    return "\n".join(lines)


def stats(directory: str, as_json: bool = False, trust: Trust | None = None) -> int:
    result = compute_stats(directory, trust)
    print(json.dumps(result) if as_json else format_stats(result))
    return 0
