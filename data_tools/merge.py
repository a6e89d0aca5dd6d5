"""Finalize a dataset folder from its per-shard state files: manifest.parquet, rejected.jsonl, the
builder's extras (the synthetic tokenizer), then dataset.json last.

A single-process build calls `finalize` itself; a parts build (`--num-parts P --part K`, one Slurm
array task each, all writing into the same --out) leaves it to `python -m data_tools merge DIR` once
every part is done. Both paths run this same function over the same state files, so a merged parts
build equals a one-process build byte for byte.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from data_tools.errors import ExitCode, UserError, atomic_write
from data_tools.manifest import manifest_table, write_dataset_info, write_manifest
from data_tools.schema import DATASET_FILE, REJECTED_FILE, SHARDS_DIR, DatasetInfo, ShardInfo
from data_tools.trust import is_local

STATE_DIR = ".build"
"""Per-shard completion records of an unfinished build (removed once dataset.json is written)."""


def read_states(out: Path, args_hash: str | None = None) -> list[dict[str, Any]]:
    """All shard states of one build, in shard order; UserError when some are missing or disagree.

    `args_hash` (from a build) ignores states left by an earlier build with other arguments.
    """
    paths = sorted((out / STATE_DIR).glob("shard-*.json"))
    states = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    if args_hash is not None:
        states = [s for s in states if s["args_hash"] == args_hash]
    if not states:
        raise UserError(f"{out}: no build state to merge (no {STATE_DIR}/shard-*.json; was a build started here?)")
    hashes = {s["args_hash"] for s in states}
    if len(hashes) > 1:
        raise UserError(f"{out}: shard states come from builds with different arguments; rebuild into an empty folder")
    num_shards = states[0]["num_shards"]
    present = {s["index"] for s in states}
    missing = sorted(set(range(num_shards)) - present)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise UserError(
            f"{out}: {len(missing)} of {num_shards} shards are not built yet ({shown}); finish every part, then merge",
            ExitCode.DATA,
        )
    return sorted((s for s in states if s["index"] < num_shards), key=lambda s: s["index"])


def write_rejected(out: Path, rejected: list[dict[str, Any]]) -> None:
    with atomic_write(out / REJECTED_FILE, "w") as f:
        for entry in rejected:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


Finish = Callable[[Path, dict[str, Any]], None]
"""A builder's extra files (e.g. synthetic writes tokenizer/), written before dataset.json."""


def finalize(out: str | os.PathLike, args_hash: str | None = None, finish: Finish | None = None) -> int:
    """Write the index files of a fully built dataset; returns the exit code."""
    out = Path(out)
    states = read_states(out, args_hash)
    builder, arguments = states[0]["builder"], states[0]["arguments"]
    shards: list[ShardInfo] = []
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    labels: set[str] = set()
    for state in states:
        rejected += state["rejected"]
        labels.update(state.get("box_labels") or ())
        if state["samples"] == 0:
            continue
        if not isinstance(state["location"], str) or not is_local(state["location"]):
            raise UserError(
                f"{out / STATE_DIR}: shard {state['index']} has the location {state['location']!r}; a build "
                f"writes file paths only, so this state file was not written by one",
                ExitCode.DATA,
            )
        for row in state["rows"]:
            rows.append({**row, "shard": len(shards)})
        shards.append(ShardInfo(state["location"], state["samples"], state["size"], state["sha256"]))
    write_rejected(out, rejected)
    counts = collections.Counter(r["reason"] for r in rejected)
    if not shards:
        raise UserError(
            f"{out}: no usable samples ({len(rejected)} rejected, see {out / REJECTED_FILE})", ExitCode.DATA
        )
    write_manifest(out, manifest_table(rows))
    if finish is not None:
        finish(out, arguments)
    info = DatasetInfo(
        builder=builder,
        arguments=arguments,
        shards=shards,
        total_samples=len(rows),
        rejected=dict(sorted(counts.items())),
        name=arguments.get("name", "data"),
        box_labels=sorted(labels) or None,
    )
    write_dataset_info(out, info)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    for stale in (out / SHARDS_DIR).glob(".*.tar.tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    print(
        f"{out}: {info.total_samples} samples in {len(shards)} shards, {len(rejected)} rejected"
        + (f" ({', '.join(f'{k}={v}' for k, v in sorted(counts.items()))})" if counts else ""),
        file=sys.stderr,
    )
    return 0


def merge(directory: str | os.PathLike, finish_for: Callable[[str], Finish | None]) -> int:
    """`python -m data_tools merge DIR`: finalize a parts build once all parts are done.
    `finish_for(builder name)`: that builder's Finish (the command line looks it up in data_tools.builders)."""
    out = Path(directory)
    if not out.is_dir():
        raise UserError(f"{out}: no such folder")
    if (out / DATASET_FILE).is_file() and not (out / STATE_DIR).is_dir():
        print(f"{out}: already merged", file=sys.stderr)
        return 0
    states = read_states(out)
    return finalize(out, states[0]["args_hash"], finish_for(states[0]["builder"]))
