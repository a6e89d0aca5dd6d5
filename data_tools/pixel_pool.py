"""Shared-memory pixel batches that a DataLoader worker reuses once the training loop is done with them.

Why: a worker sends each batch's uint8 pixels to the main process through a shared-memory segment.
A fresh segment per batch costs its page faults on the first write: 3.7 of the 4.1 ms that sending a
32 x 224 x 224 x 3 batch took, about 0.12 ms per sample, a third of what one worker spends beyond the
in-process pipeline (bench/bench_loader.py). A segment written again costs 0.7 ms.

The contract that makes reuse safe: a pooled batch carries `pixel_lease`, a one-byte shared flag that
the worker set to 1 when it filled the pixels; only `release_pixels(batch)` sets it back to 0, and
the worker refills only buffers whose flag is 0. The training loop releases through
`pretrain.engine.to_engine` (pretrain.transfer), once the copy to the device has finished (a CUDA
event recorded after it; on a CPU device at once, the copy being synchronous): nothing reads
`pixel_uint8` after that. Any other consumer (a script that keeps every
batch, a test) never releases, and the worker then takes fresh segments, as before: unreleased
batches are never overwritten.
"""

from __future__ import annotations

import math
from typing import Any

import torch

DEFAULT_CAPACITY = 4
"""Pooled buffers per worker: the DataLoader's prefetch depth (2) + the batch in use + one being released."""


def shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor whose storage is created in shared memory (zero-filled by the kernel).

    Why not `torch.empty(shape).share_memory_()`: that allocates, then copies the (uninitialised)
    bytes into a new shared segment: twice the page faults. Measured on a 32 x 224 x 224 x 3 batch:
    about 8 ms with share_memory_(), 4 ms this way (one write into fresh shared pages).
    """
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # a torch without the constructor: the copying path
        return torch.empty(shape, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(math.prod(shape))).view(shape)


class PixelPool:
    """A worker's reusable shared pixel buffers (see the module docstring for the release contract)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pixels, lease [1] uint8), both shared
        self.reused = self.fresh = 0
        """Counts of batches written into a released buffer / into a new segment (for tests and benches)."""

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels [shape] uint8 in shared memory, its lease or None when unpooled). The pixels of a reused
        buffer hold an older batch: the caller writes every byte."""
        for pixels, lease in self.buffers:
            if tuple(pixels.shape) == tuple(shape) and int(lease[0]) == 0:
                lease[0] = 1
                self.reused += 1
                return pixels, lease
        self.fresh += 1
        if len(self.buffers) >= self.capacity:
            return shared_uint8(shape), None  # every pooled buffer is still held: as without a pool
        pixels, lease = shared_uint8(shape), shared_uint8((1,))
        lease[0] = 1
        self.buffers.append((pixels, lease))
        return pixels, lease


def release_pixels(batch: dict[str, Any]) -> None:
    """The consumer is done with `pixel_uint8`: its worker may overwrite the buffer. Call it only when
    nothing will read this batch's `pixel_uint8` again (after moving it to the device)."""
    lease = batch.pop("pixel_lease", None)
    if lease is not None:
        lease.zero_()
