"""The weighted mixture's interleave (DESIGN.md 3), by counting: where sample k of dataset d sits in an
epoch list, and which (dataset, sample) sits at a position, in exact integer arithmetic over whole
arrays of positions (no per-sample arrays of the epoch). `data_tools.order` builds epoch lists on it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


# --- the mixture's interleave, by counting ------------------------------------------------------
# Entry k of dataset d (contributing c_d entries) sits at fraction (2k + 1) / (2 c_d); the list is
# sorted by (fraction, dataset). Its position is k plus, for every other dataset e, the number of
# e's entries before it: the odd numbers o = 2j + 1 with o c_d < (2k + 1) c_e (<= when e < d, as
# ties go to the lower index), i.e. floor/ceil of (2k + 1) c_e / c_d, halved. Exact integers, so
# the order is the rule's, not rounding's; identical to sorting the float fractions wherever those
# are distinct (always while the product of two datasets' counts stays below about 2^52).
def _mul_divmod(a: np.ndarray, b: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (a*b // c, a*b % c) for int64 a >= 0, ints b >= 0 and c > 0, also where a*b overflows int64.

    Beyond int64 the quotient is estimated in float64 (off by at most one for quotients below
    2^40) and corrected with the remainder, which is small, so int64 wrap-around leaves it exact.
    """
    if len(a) == 0 or int(a.max()) * b < 2**63:
        x = a * b
        return x // c, x % c
    q = np.floor(a.astype(np.float64) * (b / c)).astype(np.int64)
    with np.errstate(over="ignore"):
        r = a * np.int64(b) - q * np.int64(c)  # exact modulo 2^64, and |r| < 3c
    for _ in range(2):
        low, high = r < 0, r >= c
        q, r = q - low + high, r + c * low - c * high
    return q, r


def _entries_before(c_e: int, c_d: int, k: np.ndarray, ties_before: bool) -> np.ndarray:
    """How many of dataset e's c_e entries sort before entry k of dataset d (c_d entries)."""
    whole, rest = _mul_divmod(2 * k + 1, c_e, c_d)  # (2k + 1) c_e / c_d
    largest_odd_bound = whole if ties_before else whole - (rest == 0)  # o <= this
    return np.minimum((largest_odd_bound + 1) // 2, c_e)


def mix_position(counts: Sequence[int], d: int, k: np.ndarray) -> np.ndarray:
    """Epoch-list positions of entries k (int64 array) of dataset d in the interleave of `counts`."""
    k = np.asarray(k, dtype=np.int64)
    position = k.copy()
    for e, c_e in enumerate(counts):
        if e != d and c_e > 0:
            position += _entries_before(int(c_e), int(counts[d]), k, ties_before=e < d)
    return position


def _first_at_or_after(counts: list[int], d: int, positions: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per position p, the first k in [lo, hi] with mix_position(d, k) >= p (k = counts[d] means none), by bisection."""
    c = counts[d]
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = (lo + hi) // 2
        ahead = mix_position(counts, d, np.minimum(mid, c - 1)) >= positions
        hi = np.where(open_ & ahead, mid, hi)
        lo = np.where(open_ & ~ahead, mid + 1, lo)


def mix_locate(counts: Sequence[int], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, entry index in that dataset) of each position of the interleave of `counts`.

    Per dataset d, the first entry k with mix_position(d, k) >= p, found by bisection inside a
    bracket of a few entries (entry k's position is within datasets/2 of its fraction times the
    total); the dataset whose entry lands exactly on p holds it. Cost: per position, datasets^2
    times the log of the number of datasets; nothing depends on the sample count.
    """
    positions = np.asarray(positions, dtype=np.int64)
    counts = [int(c) for c in counts]
    total, live = sum(counts), [d for d, c in enumerate(counts) if c > 0]
    if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= total):
        raise IndexError(f"mix_locate: positions outside [0, {total})")
    if len(live) == 1:
        return np.full(len(positions), live[0], dtype=np.int64), positions.copy()
    dataset = np.full(len(positions), -1, dtype=np.int64)
    local = np.zeros(len(positions), dtype=np.int64)
    p, half = positions.astype(np.float64), len(live) / 2
    for d in live:
        c = counts[d]
        lo = np.clip(np.floor((p - half) * (c / total) - 0.5).astype(np.int64) - 1, 0, c)
        hi = np.clip(np.ceil((p + half) * (c / total) - 0.5).astype(np.int64) + 1, 0, c)
        k = _first_at_or_after(counts, d, positions, lo, hi)
        before = mix_position(counts, d, np.clip(k - 1, 0, c - 1))
        missed = (k > 0) & (before >= positions)  # the answer lies below the bracket (the bounds say never)
        if missed.any():
            raise RuntimeError(
                f"mix_locate: bracket missed for dataset {d} of counts {counts} "
                f"at positions {positions[missed][:5].tolist()}"
            )
        hit = (k < c) & (mix_position(counts, d, np.minimum(k, c - 1)) == positions)
        dataset[hit], local[hit] = d, k[hit]
    if (dataset < 0).any():
        raise RuntimeError(
            f"mix_locate: no dataset holds positions {positions[dataset < 0][:5].tolist()} of counts {counts}"
        )
    return dataset, local
