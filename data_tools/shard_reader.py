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
import mmap
import os
import tarfile
from pathlib import Path
from typing import Any

from data_tools import order, schema
from data_tools.errors import BadSample, ExitCode, UserError
from data_tools.images import DEFAULT_MAX_PIXELS
from data_tools.manifest import load_dataset_info, load_manifest
from data_tools.remote import open_shard
from data_tools.trust import Trust, is_local  # noqa: F401  (is_local: part of this module's interface)


@dataclasses.dataclass
class DatasetRef:
    """One dataset folder as the loader needs it: shard locations and the order's view of it."""

    path: str
    locations: list[str]
    source: order.Source


def open_datasets(paths: list[str], weights: list[float] | None = None, trust: Trust | None = None) -> list[DatasetRef]:
    """dataset.json of each folder (UserError naming the folder when missing or malformed), every
    shard location checked by data_tools.trust (`pipe:` commands and URLs only with the user's
    opt-in in `trust`) before anything is read."""
    refs = []
    for i, path in enumerate(paths):
        info = load_dataset_info(path)
        if info.total_samples == 0:
            raise UserError(f"{Path(path) / schema.DATASET_FILE}: the dataset has no samples", ExitCode.DATA)
        refs.append(
            DatasetRef(
                path=str(path),
                locations=info.locations(path, trust),
                source=order.Source(
                    tuple(s.samples for s in info.shards), info.sha256, float(weights[i]) if weights else 1.0
                ),
            )
        )
    return refs


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


BLOCK = tarfile.BLOCKSIZE
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
"""Leading bytes of gzip, bzip2 and xz: such a shard is read through tarfile's decompression."""


def _octal(field: bytes) -> int | None:
    """A tar header's octal number (NUL/space padded), or None for anything else (base-256, junk)."""
    digits = field.strip(b"\0 ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return None


def _plain_header(mapped: mmap.mmap, offset: int) -> tuple[str, bool, int] | None:
    """(name, is a regular file, size) of the header at `offset` when it is a plain one: a regular
    file or a directory with a valid checksum, its name in the header itself (ustar or v7). None
    for everything else (the end of the archive, GNU long names, pax headers, links, damage), which
    tarfile then reads (`_MappedTarMembers`)."""
    header = mapped[offset : offset + BLOCK]
    if len(header) < BLOCK:
        return None
    kind = header[156:157]
    if kind not in (b"0", b"\0", b"5"):
        return None
    size, checksum = _octal(header[124:136]), _octal(header[148:156])
    if (
        size is None or checksum != sum(header) - sum(header[148:156]) + 8 * 32
    ):  # the sum counts its own field as spaces
        return None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]  # ustar's; tarfile applies it whenever it is not empty
    if prefix:
        name = prefix + b"/" + name
    if not name:
        return None
    regular = kind != b"5" and not (kind == b"\0" and name.endswith(b"/"))  # tarfile: an old-style dir
    return name.decode(tarfile.ENCODING, "surrogateescape"), regular, size


class _TarMembers:
    """The regular members of a tar through tarfile: http(s) and `pipe:` streams, compressed shards."""

    def __init__(self, stream, mode: str):
        self.tar = tarfile.open(fileobj=stream, mode=mode)

    def next(self) -> tuple[str, Any] | None:
        """(name, handle for `read`) of the next regular member, or None at the end."""
        while True:
            info = self.tar.next()
            if info is None:
                return None
            self.tar.members = []  # streaming: keep no member history
            if info.isreg():
                return info.name, info

    def read(self, handle: Any) -> bytes:
        return self.tar.extractfile(handle).read()

    def close(self) -> None:
        self.tar.close()


class _MappedTarMembers:
    """The regular members of a local tar through a memory map: plain headers are parsed here and
    data sliced out of the map, other headers (GNU long names, pax, links, the end, damage) are read
    by tarfile at their offset, so what is delivered and what counts as broken is tarfile's.

    Why: tarfile's generality (every header field decoded, a seek and a tell per member, each a
    system call on a file) made reading the largest cost after decoding on small images: 60 us per
    three-member sample against 11 us here (`bench/bench_loader.py`'s `read` stage).
    """

    def __init__(self, mapped: mmap.mmap):
        self.mapped, self.offset = mapped, 0
        self._tar: tarfile.TarFile | None = None  # after a pax global header: tarfile reads the rest
        if _plain_header(mapped, 0) is None:  # tarfile's verdict on how the file starts (ReadError for a non-tar)
            mapped.seek(0)
            tarfile.TarFile(fileobj=mapped, mode="r")

    def next_header(self) -> tuple[str, bool, int, int] | None:
        """(name, regular, data offset, size) of the next member, moving past it; None at the end."""
        if self._tar is None:
            plain = _plain_header(self.mapped, self.offset)
            if plain is not None:
                name, regular, size = plain
                data = self.offset + BLOCK
                self.offset = data + -(-size // BLOCK) * BLOCK
                return name, regular, data, size
            self.mapped.seek(self.offset)
            tar = tarfile.TarFile(fileobj=self.mapped, mode="r")  # reads the member at this offset (or ends)
            info, tar.firstmember, tar.members = tar.firstmember, None, []
            if tar.pax_headers:  # a global header applies to every later member: tarfile's job from here
                self._tar = tar
            self.offset = tar.offset
        else:
            info = self._tar.next()
            self._tar.members = []
        if info is None:
            return None
        return info.name, info.isreg(), info.offset_data, info.size

    def next(self) -> tuple[str, Any] | None:
        while True:
            member = self.next_header()
            if member is None:
                return None
            name, regular, data, size = member
            if regular:
                return name, (data, size)

    def read(self, handle: tuple[int, int]) -> bytes:
        data, size = handle
        out = self.mapped[data : data + size]
        if len(out) != size:
            raise tarfile.ReadError("unexpected end of data")
        return out

    def close(self) -> None:
        self.mapped.close()


def _open_members(location: str):
    """(member source, the open stream or file to close with it) of one shard."""
    if not is_local(location):
        stream = open_shard(location)  # http(s): resumes a dropped connection
        return _TarMembers(stream, "r|*"), stream
    file = open(location, "rb")
    try:
        if file.read(6).startswith(_COMPRESSED) or os.fstat(file.fileno()).st_size == 0:
            file.seek(0)
            return _TarMembers(file, "r:*"), file  # seekable: skipped data is never read
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        file.close()
        raise
    file.close()
    try:
        return _MappedTarMembers(mapped), mapped
    except BaseException:
        mapped.close()
        raise


class ShardReader:
    """Sequential reader of one dataset's shards.

    `fetch(shard, index)` returns the raw sample (extension -> bytes, `__key__`); calls for one
    shard come in increasing index order (reopening otherwise). Samples in between are skipped by
    their tar headers, without reading their data (local shards are memory-mapped and their plain
    headers parsed directly: `_MappedTarMembers`).
    """

    def __init__(self, locations: list[str]):
        self.locations = locations
        self._shard: int | None = None
        self._members = self._stream = self._head = None
        self._index = 0  # sample index of the member at _head
        self._broken: str | None = None
        self._seen: set[str] = set()  # keys passed in the open shard (delivered or skipped)

    def close(self) -> None:
        for handle in (self._members, self._stream):
            try:
                if handle is not None:
                    handle.close()
            except Exception:
                pass
        self._members = self._stream = self._head = None

    def _open(self, shard: int) -> None:
        self.close()
        self._shard, self._index, self._broken, self._seen = shard, 0, None, set()
        location = self.locations[shard]
        try:
            self._members, self._stream = _open_members(location)
        except (OSError, ValueError, tarfile.TarError) as err:
            self._broken = f"{location}: {type(err).__name__}: {err}"
            return
        self._advance()

    def _advance(self) -> None:
        """Move _head to the next regular member that belongs to a sample (skipping webdataset's
        __meta__ members)."""
        try:
            while True:
                member = self._members.next()
                if member is None:
                    self._head = None
                    return
                split = member_key(member[0])
                if split is not None:
                    self._head = (member[1], *split)
                    return
        except (OSError, tarfile.TarError, EOFError) as err:
            self._head = None
            self._broken = f"{self.locations[self._shard]}: {type(err).__name__}: {err}"

    def fetch(self, shard: int, index: int) -> dict[str, Any]:
        if shard != self._shard or index < self._index or self._members is None and self._broken is None:
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
            handle, _, ext = self._head
            try:
                raw[ext] = self._members.read(handle)
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


def read_sample(
    dataset_dir: str | os.PathLike, key: str, max_pixels: int = DEFAULT_MAX_PIXELS, trust: Trust | None = None
) -> dict[str, Any]:
    """One sample by key through the manifest's member offsets (seeks in local shards); `trust`: the
    user's opt-in for `pipe:` and URL locations (data_tools.trust).

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
    location = info.locations(dataset_dir, trust)[shard]
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
    return {
        "key": key,
        "image_id": str(meta.get("image_id", key)),
        "image": decode_image(image_bytes, max_pixels),
        "captions": captions,
        "meta": meta,
    }
