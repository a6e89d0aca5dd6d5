"""The build driver shared by every format: raw records in, a dataset folder out (DESIGN.md 3).

A format's source only lists records (data_tools.records.Record: key, image location, captions,
annotations), or the shards that already exist with the step that indexes one (img2dataset: its
tars are not rewritten); this driver does everything else the same way for all of them:

1. plan: duplicate keys are rejected; identical images (sha256 of the input bytes) become one record
   with merged captions, boxes and phrase links; records are cut into shards by `shard_samples`
   and/or `shard_bytes` counted over *input* records and bytes. The plan depends on the inputs only,
   never on what a worker later finds bad, so shard i holds the same samples whether it is built by
   worker 0 or 3, in part 1 of 4 or in a single process, first time or after a resume;
2. shard jobs (one process each, `workers` at a time): the source's shard step, by default
   `write_shard` (read, validate, optionally resize, write the tar atomically), then a small state
   file `.build/shard-NNNNNN.json` (rows, rejects, hash) that marks the shard done: a rerun skips it;
3. finalize (data_tools.merge): manifest.parquet, rejected.jsonl, the source's `finish` extras
   (synthetic tokenizer), dataset.json last. A parts build (`num_parts > 1`) stops before this step and
   `python -m data_tools merge` runs it once all parts are done.

Bad input never stops a build (BadSample: skipped, counted, listed); bad arguments raise UserError
before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from data_tools import images
from data_tools.errors import BadSample, UserError, atomic_write_text
from data_tools.merge import STATE_DIR
from data_tools.records import Record, process_record, read_image_bytes
from data_tools.schema import DATASET_FILE, SHARD_PATTERN, SHARDS_DIR
from data_tools.trust import is_local
from data_tools.writer import ShardWriter

DEFAULT_SHARD_SAMPLES = 10_000


@dataclasses.dataclass
class Source:
    """What a format module hands the driver."""

    builder: str
    arguments: dict[str, Any]
    """Format-specific arguments, recorded in dataset.json."""
    records: Callable[[], Iterable[Record]]
    dedup: bool = True
    """Hash input images to merge identical ones (synthetic scenes skip it: they are rendered, not read)."""
    sized: bool = True
    """Whether input sizes are known (needed for --shard-bytes)."""
    existing: list[str] | None = None
    """Locations of shards that exist already (one job each, no records planned), for `make_shard`
    to index instead of writing new ones; options that shape new shards then do not apply."""
    make_shard: Callable[[ShardJob], dict[str, Any]] | None = None
    """A shard job -> its state (location, samples, size, sha256, rows, rejected); None: `write_shard`.
    A module-level function (jobs are pickled to the worker processes)."""
    finish: Callable[[Path, dict[str, Any]], None] | None = None
    """Extra files in the dataset folder before dataset.json (the synthetic tokenizer)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Arguments common to every builder."""

    out: str
    name: str
    shard_samples: int | None = None
    shard_bytes: int | None = None
    resize: int | None = None
    quality: int = images.DEFAULT_QUALITY
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    workers: int = 1
    num_parts: int = 1
    part: int = 0
    plan_only: bool = False
    """Only list, hash and cut the inputs (saved for the parts to share), build nothing."""

    def content_arguments(self) -> dict[str, Any]:
        """The options that change the dataset's bytes (workers and parts do not)."""
        return {
            k: getattr(self, k) for k in ("name", "shard_samples", "shard_bytes", "resize", "quality", "max_pixels")
        }

    def check(self) -> None:
        if self.shard_samples is not None and self.shard_samples < 1:
            raise UserError(f"--shard-samples={self.shard_samples}: must be at least 1")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise UserError(f"--shard-bytes={self.shard_bytes}: must be at least 1")
        if self.resize is not None and self.resize < 8:
            raise UserError(f"--resize={self.resize}: the longer side must be at least 8 pixels")
        if not 1 <= self.quality <= 95:
            raise UserError(f"--quality={self.quality}: must be in 1..95")
        if self.max_pixels < 1:
            raise UserError(f"--max-pixels={self.max_pixels}: must be positive")
        if self.workers < 1:
            raise UserError(f"--workers={self.workers}: must be at least 1")
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise UserError(f"--part={self.part} --num-parts={self.num_parts}: need 0 <= part < num-parts")
        if not self.name or any(c in self.name for c in "./ "):
            raise UserError(f"--name={self.name!r}: must be non-empty, without dots, slashes or spaces")


@dataclasses.dataclass
class ShardJob:
    """Everything a worker needs to build (or index) shard `index`; picklable."""

    out: str
    index: int
    records: list[Record]
    options: Options
    builder: str
    arguments: dict[str, Any]
    args_hash: str
    num_shards: int
    existing: str | None = None
    """The existing shard this job indexes (Source.existing), else None."""
    make_shard: Callable[[ShardJob], dict[str, Any]] | None = None


def arguments_hash(builder: str, arguments: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([builder, arguments], sort_keys=True).encode()).hexdigest()


def state_path(out: str | os.PathLike, index: int) -> Path:
    return Path(out) / STATE_DIR / f"shard-{index:06d}.json"


# --- step 1: plan ------------------------------------------------------------------------------------
def _hash_input(record: Record) -> tuple[str | None, int]:
    try:
        data = read_image_bytes(record)
    except BadSample:
        return None, 0
    return images.content_hash(data), len(data)


def plan_records(records: list[Record], source: Source, pool) -> list[Record]:
    """Reject duplicate keys, hash inputs, merge identical images; keeps the first occurrence's key."""
    seen: set[str] = set()
    for r in records:
        if r.key in seen and r.error is None:
            r.error = ("duplicate_key", f"key {r.key} listed twice")
        seen.add(r.key)
    if not source.dedup:
        return records
    mapper = pool.imap(_hash_input, records, chunksize=16) if pool else map(_hash_input, records)
    for r, (digest, size) in zip(records, tqdm(mapper, total=len(records), desc="hash", unit="img", disable=None)):
        r.input_hash, r.input_size = digest, size
    first: dict[str, Record] = {}
    planned: list[Record] = []
    for r in records:
        if r.error is None and r.input_hash is not None:
            if r.input_hash in first:
                first[r.input_hash].absorb(r)
                continue
            first[r.input_hash] = r
        planned.append(r)
    return planned


def cut_shards(records: list[Record], shard_samples: int | None, shard_bytes: int | None) -> list[list[Record]]:
    """Consecutive groups: at most `shard_samples` records and (unless alone) `shard_bytes` input bytes."""
    if shard_samples is None and shard_bytes is None:
        shard_samples = DEFAULT_SHARD_SAMPLES
    shards: list[list[Record]] = []
    current: list[Record] = []
    size = 0
    for r in records:
        full = shard_samples is not None and len(current) >= shard_samples
        too_big = shard_bytes is not None and current and size + r.input_size > shard_bytes
        if full or too_big:
            shards.append(current)
            current, size = [], 0
        current.append(r)
        size += r.input_size
    if current:
        shards.append(current)
    return shards


def plan_path(out: str | os.PathLike, args_hash: str) -> Path:
    return Path(out) / STATE_DIR / f"plan-{args_hash[:16]}.json"


def save_plan(path: Path, groups: list[list[Record]]) -> None:
    """Keep the plan beside the shard states: parts and resumed runs reuse it instead of re-hashing."""
    names = [f.name for f in dataclasses.fields(Record)]  # shallow: dataclasses.asdict deep-copies every list
    atomic_write_text(path, json.dumps([[{n: getattr(r, n) for n in names} for r in group] for group in groups]))


def load_plan(path: Path) -> list[list[Record]] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    groups = []
    for group in data:
        records = []
        for fields in group:
            for name in ("scene", "error"):  # JSON turned these tuples into lists
                if fields.get(name) is not None:
                    fields[name] = tuple(fields[name])
            records.append(Record(**fields))
        groups.append(records)
    return groups


def make_plan(source: Source, options: Options, args_hash: str, pool) -> list[list[Record]]:
    """The shard plan: loaded when an earlier run or part saved it, else listed, hashed, cut and saved."""
    path = plan_path(options.out, args_hash)
    groups = load_plan(path)
    if groups is None:
        records = plan_records(list(source.records()), source, pool)
        groups = cut_shards(records, options.shard_samples, options.shard_bytes)
        if source.dedup and not any(r.image_data is not None for r in records):  # worth keeping: it read every image
            save_plan(path, groups)
    return groups


# --- step 2: shard jobs --------------------------------------------------------------------------------
def run_shard_job(job: ShardJob) -> dict[str, Any]:
    """Build (or index) one shard through the source's step and write its state file; returns that state."""
    state = (job.make_shard or write_shard)(job)
    state.update(
        builder=job.builder,
        arguments=job.arguments,
        args_hash=job.args_hash,
        num_shards=job.num_shards,
        index=job.index,
    )
    atomic_write_text(state_path(job.out, job.index), json.dumps(state))
    return state


def write_shard(job: ShardJob) -> dict[str, Any]:
    """The default shard step: the job's records -> a new tar (bad ones rejected), its rows and hash."""
    o = job.options
    rows, rejected, labels = [], [], set()
    location = f"{SHARDS_DIR}/{SHARD_PATTERN.format(name=job.options.name, index=job.index)}"
    writer: ShardWriter | None = None
    try:
        for record in job.records:
            try:
                members, fields = process_record(
                    record, job.builder, max_pixels=o.max_pixels, resize=o.resize, quality=o.quality
                )
            except BadSample as bad:
                rejected.append(
                    {"key": record.key, "source": record.origin, "reason": bad.reason, "detail": bad.detail}
                )
                continue
            if writer is None:
                writer = ShardWriter(Path(job.out) / location)
            writer.add(record.key, members)
            rows.append({"key": record.key, **fields})
            labels.update(json.loads(members["json"]).get("box_labels") or ())
        if writer is None:  # every record was bad: no empty tar
            return {"location": None, "samples": 0, "size": 0, "sha256": "", "rows": [], "rejected": rejected}
        written = writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    for row in rows:
        row["members"] = written.members[row["key"]]
    return {
        "location": location,
        "samples": len(rows),
        "size": written.size,
        "sha256": written.sha256,
        "rows": rows,
        "rejected": rejected,
        "box_labels": sorted(labels),
    }


def shard_is_done(out: str, index: int, args_hash: str) -> dict[str, Any] | None:
    """The state of a shard finished by an earlier run of the same build, else None."""
    path = state_path(out, index)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("args_hash") != args_hash:
        return None
    location = state.get("location")
    if location is not None:
        if not isinstance(location, str) or not is_local(location):
            return None  # a build writes file paths only: rebuild this shard
        shard = Path(out) / location  # an absolute location stays absolute
        if not shard.is_file() or shard.stat().st_size != state["size"]:
            return None
    return state


# --- the driver ----------------------------------------------------------------------------------------
def check_out_folder(out: Path, builder: str, arguments: dict[str, Any]) -> bool:
    """True when `out` already holds this very dataset; UserError when it holds another one."""
    info_path = out / DATASET_FILE
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{info_path}: malformed; remove the folder or choose another --out") from None
    if info.get("builder") == builder and info.get("arguments") == arguments:
        return True
    raise UserError(f"--out {out}: already holds a dataset built with other arguments; choose an empty folder")


def build(source: Source, options: Options) -> int:
    """Run a build end to end (or one part of it); returns the exit code."""
    options.check()
    if options.shard_bytes is not None and not source.sized:
        raise UserError(f"--shard-bytes: not available for {source.builder} (cut its shards with --shard-samples)")
    existing_shards = source.existing
    if existing_shards is not None and (
        options.resize is not None or options.shard_samples is not None or options.shard_bytes is not None
    ):
        raise UserError(
            f"{source.builder}: its tars are indexed as they are; "
            "--resize, --shard-samples and --shard-bytes do not apply"
        )
    out = Path(options.out)
    arguments = {**source.arguments, **options.content_arguments()}
    if check_out_folder(out, source.builder, arguments):
        print(f"{out}: already complete ({DATASET_FILE} matches these arguments)", file=sys.stderr)
        return 0
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    args_hash = arguments_hash(source.builder, arguments)
    if existing_shards is None:
        import webdataset  # noqa: F401  (imports torch: once here, not again in every forked worker)
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(options.workers) if options.workers > 1 else None
    try:
        if existing_shards is not None:
            groups: list[list[Record]] = [[] for _ in existing_shards]
        else:
            groups = make_plan(source, options, args_hash, pool)
        if options.plan_only:
            print(
                f"{source.builder}: plan of {sum(map(len, groups))} records in {len(groups)} shards saved in "
                f"{plan_path(out, args_hash)}; now run the parts (--part 0..{options.num_parts - 1})",
                file=sys.stderr,
            )
            return 0
        jobs = [
            ShardJob(
                str(out),
                i,
                group,
                options,
                source.builder,
                arguments,
                args_hash,
                len(groups),
                existing_shards[i] if existing_shards is not None else None,
                source.make_shard,
            )
            for i, group in enumerate(groups)
            if i % options.num_parts == options.part
        ]
        todo = [job for job in jobs if shard_is_done(str(out), job.index, args_hash) is None]
        skipped = len(jobs) - len(todo)
        total = sum(max(1, len(job.records)) for job in todo)
        with tqdm(total=total, desc=f"build {source.builder}", unit="rec", disable=None) as bar:
            results = pool.imap_unordered(run_shard_job, todo) if pool else map(run_shard_job, todo)
            for job_state in results:
                bar.update(max(1, len(job_state.get("rows", [])) + len(job_state.get("rejected", []))))
    except BaseException:
        if pool is not None:
            pool.terminate()  # a bug or Ctrl-C: stop the workers now (finished shards stay done)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    print(
        f"{source.builder}: {len(todo)} shards built, {skipped} already done"
        + (f" (part {options.part} of {options.num_parts})" if options.num_parts > 1 else ""),
        file=sys.stderr,
    )
    if options.num_parts > 1:
        print(f"when every part is done: python -m data_tools merge {out}", file=sys.stderr)
        return 0
    from data_tools.merge import finalize

    return finalize(out, args_hash, source.finish)


# --- argument checks shared by the format modules -------------------------------------------------------
def require_dir(path: str | os.PathLike, flag: str) -> Path:
    """A folder argument that must exist (UserError naming the flag otherwise)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such folder")
    return path


def require_file(path: str | os.PathLike, flag: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    return path


def read_json_file(path: str | os.PathLike, flag: str) -> Any:
    """An annotation file argument: unreadable or malformed JSON stops the build with one line."""
    path = require_file(path, flag)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{flag} {path}: unreadable annotation file ({type(err).__name__}: {err})") from None
