"""Runs of epoch-list positions: sorted, disjoint [start, end) pairs as an int64 array [runs, 2].

Why a module of its own: the data order (order.py) describes what a layout cuts, what a cursor has
consumed and what is left as runs, never as per-sample arrays, so its cost depends on the number
of runs (shards, streams, partly consumed blocks) and not on the number of samples. The arithmetic
here is shared by planning, resume and the cursor's compact encoding.

Vocabulary: a runs array lists positions in increasing order; "index i into runs" is the i-th of
those positions (the list that the runs describe, concatenated). `ends` is the cumulative length
(np.cumsum of run lengths), computed once per array and passed along where a caller looks up often.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np

from data_tools.errors import UserError

RUNS_ENCODING = "int64-le-delta-zlib-base64"
"""How a cursor stores a base: the flattened runs [s0, e0, s1, e1, ...] as differences from the
previous value (all >= 0), little-endian int64, zlib, base64. A re-cut base has one run per hole a
partly consumed block left, so a list of pairs would be megabytes of JSON and slow to deep-copy."""


def empty_runs() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


def full_runs(length: int) -> np.ndarray:
    return np.asarray([[0, length]] if length else empty_runs(), dtype=np.int64).reshape(-1, 2)


def runs_ends(runs: np.ndarray) -> np.ndarray:
    """Cumulative lengths [runs]: index i lies in run searchsorted(ends, i, 'right')."""
    return np.cumsum(runs[:, 1] - runs[:, 0])


def runs_length(runs: np.ndarray) -> int:
    return int((runs[:, 1] - runs[:, 0]).sum())


def runs_take(runs: np.ndarray, indices: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """Epoch-list positions of the given indices into the list that `runs` describe."""
    ends = runs_ends(runs) if ends is None else ends
    lengths = runs[:, 1] - runs[:, 0]
    slot = np.searchsorted(ends, indices, side="right")
    return runs[slot, 0] + indices - (ends[slot] - lengths[slot])


def runs_from_positions(positions: np.ndarray) -> np.ndarray:
    """Sorted, distinct positions -> runs [start, end)."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) == 0:
        return empty_runs()
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.concatenate([[0], breaks])]
    ends = positions[np.concatenate([breaks - 1, [len(positions) - 1]])] + 1
    return np.stack([starts, ends], axis=1)


def coalesce(runs: np.ndarray) -> np.ndarray:
    """Sorted, disjoint runs -> the same positions as maximal runs (empty runs dropped, touching ones joined)."""
    nonempty = runs[:, 1] > runs[:, 0]
    if not nonempty.all():
        runs = runs[nonempty]
    del nonempty
    if len(runs) == 0:
        return empty_runs()
    first = np.flatnonzero(np.concatenate([[True], runs[1:, 0] != runs[:-1, 1]]))  # [maximal runs] their first run
    if len(first) == len(runs):
        return runs
    merged = np.empty((len(first), 2), dtype=np.int64)
    merged[:, 0] = runs[first, 0]
    merged[:-1, 1] = runs[first[1:] - 1, 1]
    merged[-1, 1] = runs[-1, 1]
    return merged


def take_runs(runs: np.ndarray, index_runs: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """The positions at the indices that `index_runs` (sorted, disjoint runs of indices into `runs`) name, as
    maximal runs.

    runs_take for whole ranges: each index run is split where it crosses from one run of `runs`
    into the next, so the cost is len(index_runs) + len(runs), whatever the lengths. Index runs are
    mapped _TAKE_CHUNK at a time, so the temporaries stay small beside the result (a re-cut maps
    hundreds of thousands of them).
    """
    ends = runs_ends(runs) if ends is None else ends
    starts = ends - (runs[:, 1] - runs[:, 0])  # index of each run's first position  [runs]
    pieces = [
        _take_runs_chunk(runs, index_runs[i : i + _TAKE_CHUNK], starts, ends)
        for i in range(0, len(index_runs), _TAKE_CHUNK)
    ]
    if not pieces:
        return empty_runs()
    return coalesce(np.concatenate(pieces) if len(pieces) > 1 else pieces[0])


_TAKE_CHUNK = 1 << 16


def _take_runs_chunk(runs: np.ndarray, index_runs: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """take_runs of one chunk of index runs, not coalesced."""
    index_runs = index_runs[index_runs[:, 1] > index_runs[:, 0]]
    first = np.searchsorted(ends, index_runs[:, 0], side="right")  # run holding each index run's start
    last = np.searchsorted(ends, index_runs[:, 1] - 1, side="right")  # ... and its last index
    pieces = last - first + 1  # [index runs]
    owner = np.repeat(np.arange(len(index_runs)), pieces)  # [pieces]
    run = first[owner] + np.arange(len(owner)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    lo = np.maximum(index_runs[owner, 0], starts[run])
    hi = np.minimum(index_runs[owner, 1], ends[run])
    shift = runs[run, 0] - starts[run]
    return np.stack([lo + shift, hi + shift], axis=1)


def encode_runs(runs: np.ndarray) -> dict[str, Any]:
    """Compact, JSON-safe form of runs for a cursor (see RUNS_ENCODING)."""
    flat = np.asarray(runs, dtype=np.int64).reshape(-1)
    deltas = np.diff(flat, prepend=np.int64(0)).astype("<i8")
    return {
        "encoding": RUNS_ENCODING,
        "runs": int(len(flat) // 2),
        "data": base64.b64encode(zlib.compress(deltas.tobytes(), 1)).decode("ascii"),
    }


def decode_runs(stored: Any) -> np.ndarray:
    """Runs from a cursor's `base`: the encoded form, or the list of [start, end] pairs that CURSOR_FORMAT 1 wrote."""
    if isinstance(stored, list):
        return np.asarray(stored, dtype=np.int64).reshape(-1, 2)
    if not (isinstance(stored, dict) and stored.get("encoding") == RUNS_ENCODING):
        shown = stored.get("encoding") if isinstance(stored, dict) else type(stored).__name__
        raise UserError(
            f"cursor: base={shown!r} is not allowed: expected a list of [start, end] runs or encoding {RUNS_ENCODING}"
        )
    try:
        deltas = np.frombuffer(zlib.decompress(base64.b64decode(stored["data"])), dtype="<i8")
    except (ValueError, zlib.error, KeyError) as err:
        raise UserError(f"cursor: base data cannot be decoded ({err}): the cursor is damaged") from None
    runs = np.cumsum(deltas).astype(np.int64).reshape(-1, 2)
    if len(runs) != int(stored.get("runs", -1)):
        raise UserError(
            f"cursor: base holds {len(runs)} runs but says runs={stored.get('runs')!r}: the cursor is damaged"
        )
    return runs
