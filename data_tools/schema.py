"""The one place for the on-disk contracts of DESIGN.md section 3: shard members, sample metadata,
`manifest.parquet` columns and `dataset.json` fields.

Builders write through these names, the loader and `verify` read through them; nothing else spells
a member extension or a manifest column.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pyarrow as pa

from data_tools.errors import atomic_write
from data_tools.trust import Trust, check_location, shard_locations

# --- shard members -------------------------------------------------------------------------------
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions, in order of preference when a sample has several."""
TEXT_EXTENSION = "txt"
META_EXTENSION = "json"
FEATURE_EXTENSION = "feat.npy"
"""Optional precomputed visual features: m x D float16."""
GEOMETRY_EXTENSION = "pos.npy"
"""Optional box geometry for the features: m x 7 (x1, y1, x2, y2, w, h, area), normalised."""
REFUSED_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt", "ckpt", "npz")
"""Members that would need unpickling: refused and counted, never loaded."""

SHARD_PATTERN = "{name}-{index:06d}.tar"
"""Shard file names inside `shards/`."""

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
REJECTED_FILE = "rejected.jsonl"
TOKENIZER_DIR = "tokenizer"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1

# --- manifest.parquet ----------------------------------------------------------------------------
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int32()),  # index into dataset.json "shards"
        ("members", pa.string()),  # JSON {"jpg": [offset, size], "txt": [...], ...}: data offset and size in the tar
        ("image_id", pa.string()),
        ("num_captions", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_bytes", pa.int64()),
        ("content_hash", pa.string()),  # sha256 of the stored image bytes
        ("split", pa.string()),
    ]
)


# --- dataset.json --------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardInfo:
    """One shard as listed in dataset.json."""

    location: str
    """Path relative to the dataset folder, an absolute path, a URL or a `pipe:` command."""
    samples: int
    size: int
    sha256: str


@dataclasses.dataclass
class DatasetInfo:
    """The content of dataset.json, the dataset's commit marker (written last)."""

    builder: str
    arguments: dict[str, Any]
    shards: list[ShardInfo]
    total_samples: int
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    """Rejected inputs by reason (build time)."""
    name: str = "data"
    format_version: int = FORMAT_VERSION
    sha256: str = ""
    """Fingerprint of the dataset: sha256 over the shards' sha256 values in order (the cursor records it)."""
    box_labels: list[str] | None = None
    """Sorted distinct box categories found in the samples' json `box_labels` (None: no sample has them).
    The vocabulary of MRC classes; `objectives.mrm.mrc` is refused at config time without it."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DatasetInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**kwargs)

    def locations(self, root: str | os.PathLike, trust: Trust | None = None) -> list[str]:
        """Every shard's location as the readers open it (relative paths join the dataset folder),
        all checked by data_tools.trust before any is opened: a `pipe:` command or a URL only with
        the user's opt-in in `trust` (default: none), else UserError (exit 3)."""
        return list(shard_locations(root, [s.location for s in self.shards], trust))

    def resolve(self, root: str | os.PathLike, location: str, trust: Trust | None = None) -> str:
        """One shard location through the same check as `locations`."""
        index = next((i for i, s in enumerate(self.shards) if s.location == location), 0)
        return check_location(root, index, location, trust)


def fingerprint(shard_hashes: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in shard_hashes:
        h.update(s.encode())
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through errors.atomic_write (readers see old or new, never half)."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
