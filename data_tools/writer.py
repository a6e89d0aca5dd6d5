"""One shard on disk: samples written through webdataset's TarWriter into a temporary file that is
renamed into place only when complete, so a reader (or a resumed build) never sees half a shard.

Tars are reproducible (fixed mtime, owner and mode, members in sorted order per sample), so the same
samples give byte-identical shards whichever process wrote them. After closing, the member offsets
are read back from the tar headers: the manifest stores them so the loader can seek to one sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from data_tools.errors import atomic_replace
from data_tools.shard_reader import sample_members

TAR_MTIME = 0
"""Fixed member mtime: a timestamp would make every rebuild differ."""


@dataclasses.dataclass
class WrittenShard:
    """A finished shard: its size, sha256 and, per key, {extension: [data offset, size]}."""

    path: Path
    size: int
    sha256: str
    members: dict[str, dict[str, list[int]]]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def member_offsets(path: str | os.PathLike) -> dict[str, dict[str, list[int]]]:
    """{key: {extension: [data offset, size]}} from a tar's headers, keys in stored order (the
    key/extension split is the reader's, `shard_reader.member_key`)."""
    return {key: {ext: list(span) for ext, span in members.items()} for key, members in sample_members(path)}


class ShardWriter:
    """Write one shard: `add(key, {ext: bytes})` per sample, then `finish()`; `abort()` on error."""

    def __init__(self, path: str | os.PathLike):
        import webdataset as wds  # imports torch: only where a shard is actually written

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = open(self.tmp, "wb", buffering=1 << 20)
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME, user="relalign", group="relalign")
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        assert "." not in key and key, f"shard keys must be non-empty and dot-free: {key!r}"
        self._tar.write({"__key__": key, **members})
        self.count += 1

    def finish(self) -> WrittenShard:
        """Close, fsync and rename into place; return size, sha256 and member offsets."""
        self._tar.close()
        self._file.close()
        atomic_replace(self.tmp, self.path)  # fsyncs the tar and the folder
        return WrittenShard(self.path, self.path.stat().st_size, file_sha256(self.path), member_offsets(self.path))

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)
