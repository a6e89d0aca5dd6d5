"""`python -m data_tools verify DIR`: check every shard against dataset.json and manifest.parquet.

Per shard: it exists, its size and sha256 are the recorded ones, its samples (as webdataset groups
members) are the manifest's keys in the manifest's order with the recorded member offsets, and,
unless --no-decode, every sample decodes (image through the same safe decoder as the loader, UTF-8
caption, JSON metadata). A sample that is listed in rejected.jsonl (an img2dataset tar indexed in
place keeps its bad samples) is expected to fail and is not a mismatch.
`pipe:` commands and URLs are read only with the user's opt-in (--allow-pipe, --allow-remote:
data_tools.trust); without it every such shard is reported and nothing is read, never "OK".
Prints one line per problem and a summary; exit code 3 (ExitCode.DATA) when anything is wrong.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import tarfile
from pathlib import Path
from data_tools import images
from data_tools.errors import BadSample, ExitCode
from data_tools.manifest import load_dataset
from data_tools.schema import IMAGE_EXTENSIONS, REFUSED_EXTENSIONS, REJECTED_FILE
from data_tools.shard_reader import member_key
from data_tools.trust import Trust, is_local, refusals


@dataclasses.dataclass
class ShardCheck:
    """What a worker needs to check one shard (picklable)."""

    index: int
    path: str
    local: bool
    size: int
    sha256: str
    rows: list[tuple[str, dict[str, list[int]]]]  # (key, members) in manifest order
    decode: bool
    max_pixels: int
    expected_bad: frozenset[str]
    features: dict | None = None
    """A feature cache's `arguments.features` (data_tools.features): its samples carry features, not images."""


def _open(check: ShardCheck):
    if check.local:
        return open(check.path, "rb")
    from data_tools.remote import open_shard

    return open_shard(check.path)  # http(s): resumes a dropped connection; the hash covers every byte


class _HashingReader(io.RawIOBase):
    """Passes a stream through while hashing and counting it (remote shards are read once)."""

    def __init__(self, stream):
        import hashlib

        self.stream, self.hash, self.size = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        self.hash.update(data)
        self.size += len(data)
        buffer[: len(data)] = data
        return len(data)


def check_sample(members: dict[str, bytes], max_pixels: int, features: dict | None = None) -> None:
    """Raise BadSample if the loader would reject this sample (`features`: a feature cache's record,
    whose samples need feat.npy / pos.npy of the recorded shapes, finite, instead of an image)."""
    if any(ext.rsplit(".", 1)[-1] in REFUSED_EXTENSIONS for ext in members):
        raise BadSample("refused_member")
    if features is not None:
        from data_tools.features import check_feature_members

        check_feature_members(members, features)
    else:
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            raise BadSample("missing_image")
        images.decode_image(members[ext], max_pixels)
    try:
        if "txt" in members and not members["txt"].decode("utf-8").strip():
            raise BadSample("empty_caption")
        if "json" in members and not isinstance(json.loads(members["json"].decode("utf-8")), dict):
            raise BadSample("bad_metadata", "json member is not an object")
    except UnicodeDecodeError:
        raise BadSample("bad_utf8") from None
    except ValueError as err:
        raise BadSample("bad_metadata", str(err)) from None


def check_shard(check: ShardCheck) -> list[str]:
    """Problems found in one shard, each one line."""
    name = f"shard {check.index} ({check.path})"
    if check.local and not Path(check.path).is_file():
        return [f"{name}: missing"]
    problems: list[str] = []
    groups: list[tuple[str, dict[str, list[int]], dict[str, bytes]]] = []
    try:
        with _open(check) as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                for info in tar:
                    split = member_key(info.name) if info.isfile() else None
                    if split is None:  # not part of a sample for the reader either
                        continue
                    key, ext = split
                    if not groups or groups[-1][0] != key:
                        groups.append((key, {}, {}))
                    groups[-1][1][ext] = [info.offset_data, info.size]
                    if check.decode:
                        groups[-1][2][ext] = tar.extractfile(info).read()
            while reader.read(1 << 20):  # hash the tar's end padding too
                pass
    except (OSError, tarfile.TarError) as err:
        return [f"{name}: unreadable ({type(err).__name__}: {err})"]
    if reader.size != check.size:
        problems.append(f"{name}: size {reader.size} != {check.size} in dataset.json")
    if reader.hash.hexdigest() != check.sha256:
        problems.append(f"{name}: sha256 differs from dataset.json")
    if len(groups) != len(check.rows):
        problems.append(f"{name}: {len(groups)} samples, dataset.json and the manifest say {len(check.rows)}")
    for (key, offsets, _), (want_key, want_members) in zip(groups, check.rows):
        if key != want_key:
            problems.append(f"{name}: sample {key} where the manifest has {want_key}")
            break
        if check.local and offsets != want_members:
            problems.append(f"{name}: member offsets of {key} differ from the manifest")
    if check.decode:
        for key, _, members in groups:
            try:
                check_sample(members, check.max_pixels, check.features)
            except BadSample as bad:
                if key not in check.expected_bad:
                    problems.append(f"{name}: sample {key} is bad ({bad})")
    return problems


def rejected_keys(directory: Path) -> frozenset[str]:
    path = directory / REJECTED_FILE
    if not path.is_file():
        return frozenset()
    keys = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keys.add(json.loads(line)["key"])
        except (ValueError, KeyError, TypeError):
            continue
    return frozenset(keys)


def verify(
    directory: str, workers: int = 1, decode: bool = True, max_pixels: int | None = None, trust: Trust | None = None
) -> int:
    root = Path(directory)
    info, table = load_dataset(root)
    refused = refusals(root, [s.location for s in info.shards], trust)
    if refused:  # checked before any shard is read: verifying must not run what it checks
        for reason in refused.values():
            print(reason)
        what = "1 shard is" if len(refused) == 1 else f"{len(refused)} shards are"
        print(
            f"verify {root}: {len(info.shards)} shards, {info.total_samples} samples: {what} not allowed to be "
            f"read, nothing checked"
        )
        return int(ExitCode.DATA)
    locations = info.locations(root, trust)
    limit = max_pixels or info.arguments.get("max_pixels") or images.DEFAULT_MAX_PIXELS
    rows: dict[int, list[tuple[str, dict[str, list[int]]]]] = {i: [] for i in range(len(info.shards))}
    problems: list[str] = []
    for key, shard, members in zip(*(table.column(c).to_pylist() for c in ("key", "shard", "members"))):
        if shard not in rows:
            problems.append(f"manifest: sample {key} names shard {shard}, dataset.json lists {len(info.shards)}")
            continue
        rows[shard].append((key, json.loads(members)))
    # only an img2dataset index keeps rejected samples inside its (untouched) tars
    expected_bad = rejected_keys(root) if info.builder == "img2dataset" else frozenset()
    checks = []
    for i, (shard, location) in enumerate(zip(info.shards, locations)):
        checks.append(
            ShardCheck(
                i,
                location,
                is_local(location),
                shard.size,
                shard.sha256,
                rows[i],
                decode,
                limit,
                expected_bad,
                info.arguments.get("features") if info.builder == "features" else None,
            )
        )
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:
            results = pool.map(check_shard, checks)
    else:
        results = [check_shard(c) for c in checks]
    for result in results:
        problems += result
    for line in problems:
        print(line)
    status = "OK" if not problems else f"{len(problems)} problems"
    what = "sizes, hashes, keys, offsets" + (", decoding" if decode else "")
    print(f"verify {root}: {len(info.shards)} shards, {info.total_samples} samples ({what}): {status}")
    return int(ExitCode.OK if not problems else ExitCode.DATA)
