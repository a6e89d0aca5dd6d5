"""Host-to-device copies of loader batches: pinned staging, non-blocking copies, and a pixel lease
released only once nothing reads the host memory any more.

Why: a copy from pageable memory (what a DataLoader worker sends: shared memory, not pinned) is
synchronous in effect: the host thread waits until the stream reaches the copy and the bytes are
through, so it cannot prepare the next batch while the device computes. A copy from pinned memory
with `non_blocking=True` is only queued; the host returns at once.

DataLoader's own `pin_memory=True` is not used: it copies every tensor into new pinned memory in a
thread, `pixel_lease` included, so the training loop would release a copy of the flag and the
worker would never reuse its pixel buffers (data_tools.pixel_pool). Pinning the pool's shared
buffers instead would make the copy read them after `to_engine` returns, so releasing them there
would let the worker overwrite pixels the device has not received yet.

What `DeviceFeeder` does instead, per batch on a CUDA device: each host tensor that is not pinned is
copied into a pinned staging tensor (torch's caching host allocator: it records the copy on the
block and does not hand the block out again before the copy has finished), then queued to the
device with `non_blocking=True`; a tensor that is pinned already is queued directly. A `CopyEvent`
recorded after the last copy says when every copy of the batch is done; only then is the batch's
pixel lease released, whichever tensor the copy read. On a CPU device the copies are synchronous,
the event is done when recorded, and the lease is released before `to_engine` returns: the same
code path, which is what the tests exercise (with a fake event that is not done yet).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol

import torch

from data_tools.pixel_pool import release_pixels
from data_tools.batch import HOST_KEYS
from data_tools.transforms import normalise_batch


class CopyEvent(Protocol):
    """What the feeder needs of a CUDA event recorded after a batch's copies."""

    def query(self) -> bool:
        """True once every copy queued before the event was recorded has finished."""

    def synchronize(self) -> None:
        """Wait until query() is True."""


class DoneEvent:
    """The event of synchronous copies (a CPU device): done when recorded."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def record_copy_event(device: torch.device) -> CopyEvent:
    """An event recorded on the current stream of `device` after the copies queued so far."""
    if device.type != "cuda":
        return DoneEvent()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def to_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor built in the middle of a step (indices, tokenised captions) on `device` without
    blocking: staged in pinned memory and copied asynchronously on the current stream, which orders it
    before the kernels that read it. A plain `.to(device)` from pageable memory waits for the stream
    (a synchronisation per call); tensors already on `device` are returned as they are."""
    device = torch.device(device)
    staged = value.pin_memory() if device.type == "cuda" and value.device.type == "cpu" else value
    return staged.to(device, non_blocking=True)


class DeviceFeeder:
    """Moves loader batches to one device (see the module docstring); keeps the pixel leases of
    batches whose copies may still be running and releases them, oldest first, once their event is
    done (checked at every batch, and by `release_done` / `flush`).

    record_event: makes the event after a batch's copies (tests pass a fake one).
    """

    def __init__(self, device: torch.device, record_event: Callable[[torch.device], CopyEvent] = record_copy_event):
        self.device = torch.device(device)
        self.record_event = record_event
        self.pending: deque[tuple[CopyEvent, dict[str, Any]]] = deque()
        """(event, {"pixel_lease": lease}) of batches not yet released, in the order they were copied."""
        self._stage = self.device.type == "cuda"

    def __call__(self, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """The batch on the device, floating tensors in `dtype`, `pixel_uint8` normalised into
        `pixel_values`. The host batch's `pixel_lease` moves to this feeder: it is released once the
        copies have finished, so nothing may read `batch["pixel_uint8"]` after this call."""
        self.release_done()
        moved = {k: self._move(v, dtype) for k, v in batch.items() if k != "pixel_lease"}
        lease = {"pixel_lease": batch.pop("pixel_lease")} if "pixel_lease" in batch else {}
        self.pending.append((self.record_event(self.device), lease))
        moved["host"] = {k: batch[k] for k in HOST_KEYS if k in batch}  # read as numbers: no device sync
        moved = normalise_batch(moved)  # on the device, into new memory: queued after the copies
        if "pixel_values" in moved and moved["pixel_values"].dtype != dtype:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        self.release_done()
        return moved

    def _move(self, value: Any, dtype: torch.dtype) -> Any:
        if torch.is_tensor(value):
            if self._stage and value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()  # [same shape] pinned staging: a host copy, done when it returns
            return value.to(
                device=self.device, dtype=dtype if value.is_floating_point() else value.dtype, non_blocking=True
            )
        if isinstance(value, list) and value and all(torch.is_tensor(x) for x in value):
            return [self._move(x, dtype) for x in value]
        return value

    def release_done(self) -> int:
        """Release the leases of the batches whose copies have finished (oldest first: events on one
        stream complete in order); returns how many are still pending."""
        while self.pending and self.pending[0][0].query():
            release_pixels(self.pending.popleft()[1])
        return len(self.pending)

    def flush(self) -> None:
        """Wait for every pending copy and release every lease (before dropping the feeder)."""
        while self.pending:
            event, lease = self.pending.popleft()
            event.synchronize()
            release_pixels(lease)
