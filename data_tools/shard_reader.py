"""Reading samples out of tar shards: dataset folders as the loader sees them, a sequential shard
reader that skips unwanted samples by their tar headers, and one sample by key through the manifest.

Why apart from the loader: this is the only code that touches shard bytes (local files, URLs and
`pipe:` commands through data_tools.remote); the loader's stages and `read_sample` share it. It
also owns the one rule that splits a tar member name into sample key and extension (`member_key`),
which the shard writer and the img2dataset indexer use too, so that what the build counts as a
sample is what the reader delivers.

Exactly once within a shard: a key that a shard holds twice (img2dataset tars can) is one sample;
its second copy keeps its position (the indexer lists it as `duplicate_key`) and every reading path
skips it as the bad sample `duplicate_key`: the reader remembers the keys it has passed in the
shard, skipped ones included, so a range that starts inside the shard or a resumed stream agrees.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from data_tools import order, schema
from data_tools.errors import BadSample, ExitCode, UserError
from data_tools.images import DEFAULT_MAX_PIXELS
from data_tools.manifest import load_dataset_info, load_manifest
from data_tools.remote import open_shard


@dataclasses.dataclass
class DatasetRef:
    """One dataset folder as the loader needs it: shard locations and the order's view of it."""

    path: str
    locations: list[str]
    source: order.Source


def open_datasets(paths: list[str], weights: list[float] | None = None) -> list[DatasetRef]:
    """dataset.json of each folder (UserError naming the folder when missing or malformed)."""
    refs = []
    for i, path in enumerate(paths):
        info = load_dataset_info(path)
        if info.total_samples == 0:
            raise UserError(f"{Path(path) / schema.DATASET_FILE}: the dataset has no samples", ExitCode.DATA)
        refs.append(
            DatasetRef(
                path=str(path),
                locations=[info.resolve(path, s.location) for s in info.shards],
                source=order.Source(tuple(s.samples for s in info.shards), info.sha256, float(weights[i]) if weights else 1.0),
            )
        )
    return refs


def is_local(location: str) -> bool:
    return "://" not in location and not location.startswith("pipe:")


def member_key(name: str) -> tuple[str, str] | None:
    """A tar member name -> (sample key, extension) as webdataset splits it: the extension starts at
    the first dot of the base name (`d/k.feat.npy` -> (`d/k`, `feat.npy`)). None for a member that
    belongs to no sample: no dot, an empty stem, or webdataset's `__name__` bookkeeping members."""
    if name.startswith("__") and name.endswith("__"):
        return None
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext


def sample_members(path: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a local tar as the reader groups them: consecutive regular members sharing a
    key, in stored order, each {extension: (data offset, size)} from the headers (no data read).
    A key stored twice apart gives two entries (the second is a `duplicate_key` when read)."""
    groups: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            split = member_key(info.name) if info.isreg() else None
            if split is None:
                continue
            key, ext = split
            if not groups or groups[-1][0] != key:
                groups.append((key, {}))
            groups[-1][1][ext] = (info.offset_data, info.size)
    return groups


def duplicate_positions(keys: list[str], shards: list[int]) -> list[bool]:
    """Per manifest row (rows in dataset order): True when an earlier row of the same shard has the
    same key, i.e. the copy every reading path skips as `duplicate_key`."""
    seen: set[tuple[int, str]] = set()
    out = []
    for key, shard in zip(keys, shards):
        out.append((shard, key) in seen)
        seen.add((shard, key))
    return out


class ShardReader:
    """Sequential reader of one dataset's shards.

    `fetch(shard, index)` returns the raw sample (extension -> bytes, `__key__`); calls for one
    shard come in increasing index order (reopening otherwise). Samples in between are skipped by
    their tar headers, without reading their data into Python (local files seek past it).
    """

    def __init__(self, locations: list[str]):
        self.locations = locations
        self._shard: int | None = None
        self._stream = self._tar = self._head = None
        self._index = 0  # sample index of the member at _head
        self._broken: str | None = None
        self._seen: set[str] = set()  # keys passed in the open shard (delivered or skipped)

    def close(self) -> None:
        for handle in (self._tar, self._stream):
            try:
                if handle is not None:
                    handle.close()
            except Exception:
                pass
        self._stream = self._tar = self._head = None

    def _open(self, shard: int) -> None:
        self.close()
        self._shard, self._index, self._broken, self._seen = shard, 0, None, set()
        location = self.locations[shard]
        try:
            if is_local(location):
                self._stream = open(location, "rb")
                self._tar = tarfile.open(fileobj=self._stream, mode="r:*")  # seekable: skipped data is never read
            else:
                self._stream = open_shard(location)  # http(s): resumes a dropped connection
                self._tar = tarfile.open(fileobj=self._stream, mode="r|*")
        except (OSError, tarfile.TarError) as err:
            self._broken = f"{location}: {type(err).__name__}: {err}"
            return
        self._advance()

    def _advance(self) -> None:
        """Move _head to the next regular member (skipping webdataset's __meta__ members)."""
        try:
            while True:
                info = self._tar.next()
                if info is None:
                    self._head = None
                    return
                self._tar.members = []  # streaming: keep no member history
                split = member_key(info.name) if info.isreg() else None
                if split is not None:
                    self._head = (info, *split)
                    return
        except (OSError, tarfile.TarError, EOFError) as err:
            self._head = None
            self._broken = f"{self.locations[self._shard]}: {type(err).__name__}: {err}"

    def fetch(self, shard: int, index: int) -> dict[str, Any]:
        if shard != self._shard or index < self._index or self._tar is None and self._broken is None:
            self._open(shard)
        while self._head is not None and self._index < index:  # skip whole samples by header
            self._skip_sample()
        if self._head is None:
            reason = self._broken or f"{self.locations[shard]} ends before sample {index}"
            raise BadSample("decode_error", reason)
        key = self._head[1]
        if key in self._seen:
            self._skip_sample()
            raise BadSample("duplicate_key", f"{self.locations[shard]}: key {key} already delivered from this shard")
        self._seen.add(key)
        raw: dict[str, Any] = {"__key__": key}
        while self._head is not None and self._head[1] == key:
            member, _, ext = self._head
            try:
                raw[ext] = self._tar.extractfile(member).read()
            except (OSError, tarfile.TarError, EOFError) as err:
                self._broken = f"{self.locations[shard]}: {type(err).__name__}: {err}"
                self._head = None
                raise BadSample("decode_error", self._broken) from None
            self._advance()
        self._index += 1
        return raw

    def _skip_sample(self) -> None:
        """Move past the sample at _head by its headers, remembering its key."""
        key = self._head[1]
        self._seen.add(key)
        while self._head is not None and self._head[1] == key:
            self._advance()
        self._index += 1


def read_sample(dataset_dir: str | os.PathLike, key: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """One sample by key through the manifest's member offsets (seeks in local shards).

    Returns {key, image_id, image (PIL RGB), captions (all), meta (the json, parsed)}; UserError
    when the key is not in the manifest; BadSample when the stored sample is unusable.
    """
    import pyarrow.compute as pc

    from data_tools.decode import _image_member, parse_meta, refuse_pickles
    from data_tools.images import decode_image

    info = load_dataset_info(dataset_dir)
    table = load_manifest(dataset_dir)
    rows = table.filter(pc.equal(table.column("key"), key))
    if rows.num_rows == 0:
        raise UserError(f"{Path(dataset_dir) / schema.MANIFEST_FILE}: no sample with key {key!r}")
    shard = int(rows.column("shard")[0].as_py())
    members = json.loads(rows.column("members")[0].as_py())
    location = info.resolve(dataset_dir, info.shards[shard].location)
    raw: dict[str, Any] = {"__key__": key}
    if is_local(location):
        with open(location, "rb") as f:
            for ext, (offset, size) in members.items():
                f.seek(offset)
                raw[ext] = f.read(size)
    else:  # remote: stream the shard up to the sample
        shard_keys = table.filter(pc.equal(table.column("shard"), shard)).column("key").to_pylist()
        reader = ShardReader([location])
        try:
            raw = reader.fetch(0, shard_keys.index(key))
        finally:
            reader.close()
    refuse_pickles(raw)
    meta = parse_meta(raw)
    image_bytes = _image_member(raw)
    if image_bytes is None:
        raise BadSample("missing_image", key)
    captions = meta.get("captions") or ([raw["txt"].decode("utf-8", "replace")] if "txt" in raw else [])
    return {"key": key, "image_id": str(meta.get("image_id", key)), "image": decode_image(image_bytes, max_pixels), "captions": captions, "meta": meta}
