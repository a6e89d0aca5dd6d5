"""Reading and writing a dataset folder's index files: `manifest.parquet` (a row per sample) and
`dataset.json` (the commit marker, written last), as defined in DESIGN.md 3 and data_tools.schema.

Everything that reads a dataset (loader, verify, stats, tokenizer training) comes through
`load_dataset_info` / `load_manifest`, so a missing or malformed index is one clear UserError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_tools.errors import ExitCode, UserError, atomic_write
from data_tools.schema import (
    DATASET_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    DatasetInfo,
    fingerprint,
    write_json_atomic,
)


def load_dataset_info(directory: str | os.PathLike) -> DatasetInfo:
    """dataset.json of a dataset folder; UserError naming the file when absent or malformed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such dataset folder")
    path = directory / DATASET_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing (not a finished dataset: build it, or run merge after a parts build)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        info = DatasetInfo.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{path}: malformed dataset.json ({type(err).__name__}: {err})", ExitCode.DATA) from None
    bad = next((i for i, s in enumerate(info.shards) if not isinstance(s.location, str) or not s.location), None)
    if bad is not None:
        raise UserError(
            f"{path}: malformed dataset.json (shard {bad}: location {info.shards[bad].location!r} is not "
            f"a path, URL or pipe: command)",
            ExitCode.DATA,
        )
    if not isinstance(info.shards, list) or info.total_samples != sum(s.samples for s in info.shards):
        raise UserError(f"{path}: malformed dataset.json (total_samples does not match the shards)", ExitCode.DATA)
    return info


def category_vocabulary(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The sorted union of the datasets' `box_labels` (dataset.json): box categories, index = class.

    Empty when no dataset records categories (then MRC and object tags have nothing to use)."""
    labels: set[str] = set()
    for path in paths:
        if "://" in str(path) or str(path).startswith("pipe:"):
            continue  # a remote dataset.json is read by its loader, not here
        labels.update(load_dataset_info(path).box_labels or ())
    return sorted(labels)


def load_manifest(directory: str | os.PathLike) -> pa.Table:
    """manifest.parquet of a dataset folder (schema.MANIFEST_SCHEMA), rows in dataset order."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing (not a finished dataset)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path}: unreadable manifest ({err})") from None
    missing = [f.name for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    if missing:
        raise UserError(f"{path}: manifest lacks columns {missing}")
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def load_dataset(directory: str | os.PathLike) -> tuple[DatasetInfo, pa.Table]:
    """Both index files, checked against each other (row count per shard)."""
    info = load_dataset_info(directory)
    table = load_manifest(directory)
    where = Path(directory) / MANIFEST_FILE
    if table.num_rows != info.total_samples:
        raise UserError(f"{where}: {table.num_rows} rows but dataset.json says {info.total_samples} samples")
    counts = dict(zip(*pc.value_counts(table.column("shard")).flatten()))  # {shard index: rows}
    counts = {int(k.as_py()): int(v.as_py()) for k, v in counts.items()}
    outside = sorted(k for k in counts if not 0 <= k < len(info.shards))
    if outside:
        raise UserError(
            f"{where}: {counts[outside[0]]} rows name shard {outside[0]}, but dataset.json lists "
            f"{len(info.shards)} shards (0 to {len(info.shards) - 1})"
        )
    for index, shard in enumerate(info.shards):
        if counts.get(index, 0) != shard.samples:
            raise UserError(
                f"{where}: {counts.get(index, 0)} rows for shard {index} ({shard.location}) but dataset.json says "
                f"{shard.samples} samples"
            )
    return info, table


def manifest_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with MANIFEST_SCHEMA's fields; `members` may be a dict) -> an Arrow table."""
    columns: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    for row in rows:
        for name in MANIFEST_SCHEMA.names:
            value = row[name]
            if name == "members" and not isinstance(value, str):
                value = json.dumps(value, separators=(",", ":"), sort_keys=True)
            columns[name].append(value)
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def write_manifest(directory: str | os.PathLike, table: pa.Table) -> None:
    """Write manifest.parquet atomically (errors.atomic_write: temporary name, fsync, rename)."""
    with atomic_write(Path(directory) / MANIFEST_FILE, "wb") as f:
        pq.write_table(table, f, compression="zstd")


def write_dataset_info(directory: str | os.PathLike, info: DatasetInfo) -> None:
    """Write dataset.json (fills in the fingerprint); call it last, it marks the dataset complete."""
    info.sha256 = fingerprint([s.sha256 for s in info.shards])
    info.total_samples = sum(s.samples for s in info.shards)
    write_json_atomic(Path(directory) / DATASET_FILE, info.to_json())
