"""The to-device path (pretrain.transfer) and the pixel pool's lease: a buffer is released only once its
copy has finished, and a reused buffer never changes a batch already handed to the step."""

from __future__ import annotations

import torch

from data_tools.pixel_pool import PixelPool
from data_tools.transforms import normalise
from pretrain.engine import to_engine
from pretrain.transfer import DeviceFeeder, DoneEvent

SHAPE = (4, 8, 8, 3)


class Engine:  # what to_engine reads of a DeepSpeed engine: its device and its module's dtype
    device = torch.device("cpu")
    module = torch.nn.Linear(2, 2)


class PendingEvent:
    """A copy that has not finished until the test says so (what a CUDA event is while the DMA runs)."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def pooled_batch(pool: PixelPool, value: int) -> dict:
    pixels, lease = pool.take(SHAPE)
    pixels.fill_(value)  # the worker writes every byte
    return {"pixel_uint8": pixels, "pixel_lease": lease, "sample_mask": torch.ones(SHAPE[0], dtype=torch.bool)}


def test_the_lease_waits_for_the_copy_event():
    events: list[PendingEvent] = []

    def record(device: torch.device) -> PendingEvent:
        events.append(PendingEvent())
        return events[-1]

    pool = PixelPool(capacity=1)
    feeder = DeviceFeeder(torch.device("cpu"), record_event=record)
    first = pooled_batch(pool, 10)
    lease, buffer = first["pixel_lease"], first["pixel_uint8"]
    moved = feeder(first, torch.float32)
    assert "pixel_lease" not in first and "pixel_lease" not in moved
    assert int(lease[0]) == 1 and feeder.release_done() == 1  # copy still running: the buffer stays leased
    second = pooled_batch(pool, 20)  # so the worker takes a fresh segment instead of overwriting it
    assert pool.reused == 0 and second["pixel_uint8"].data_ptr() != buffer.data_ptr()
    events[0].done = True
    feeder(second, torch.float32)  # the next batch finds the first copy done and releases its buffer
    assert int(lease[0]) == 0 and len(feeder.pending) == 1  # the second's event is not done yet
    third = pooled_batch(pool, 30)
    assert pool.reused == 1 and third["pixel_uint8"].data_ptr() == buffer.data_ptr()  # released: written again
    feeder.flush()  # waits for every event, releases the rest
    assert not feeder.pending and "pixel_lease" not in second


def test_a_reused_buffer_never_changes_a_batch_handed_to_the_step():
    pool = PixelPool(capacity=1)
    feeder = DeviceFeeder(torch.device("cpu"))  # CPU: copies are synchronous, the event is done when recorded
    first = pooled_batch(pool, 7)
    buffer = first["pixel_uint8"]
    moved = feeder(first, torch.float32)
    expected = normalise(torch.full(SHAPE, 7, dtype=torch.uint8))
    assert not feeder.pending  # released at once
    for value in (50, 100, 255):  # the worker reuses the one buffer for later batches with other pixels
        later = pooled_batch(pool, value)
        assert later["pixel_uint8"].data_ptr() == buffer.data_ptr()
        feeder(later, torch.float32)
    assert pool.reused == 3 and int(buffer[0, 0, 0, 0]) == 255
    assert torch.equal(moved["pixel_values"], expected)  # the first batch as it was handed over


def test_to_engine_without_a_feeder_releases_before_returning():
    pool = PixelPool()
    batch = pooled_batch(pool, 3)
    lease = batch["pixel_lease"]
    moved = to_engine(batch, Engine())
    assert int(lease[0]) == 0 and set(moved) == {"pixel_values", "sample_mask", "host"}
    assert moved["host"]["sample_mask"] is batch["sample_mask"]  # the loader's own tensor: read without a sync
    assert DoneEvent().query()


def test_the_training_feeder_releases_in_order_and_moves_lists():
    events: list[PendingEvent] = []
    feeder = DeviceFeeder(torch.device("cpu"), record_event=lambda d: events.append(PendingEvent()) or events[-1])
    pool = PixelPool(capacity=2)
    a, b = pooled_batch(pool, 1), pooled_batch(pool, 2)
    la, lb = a["pixel_lease"], b["pixel_lease"]
    b["boxes"] = [torch.zeros(2, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)]
    feeder(a, torch.bfloat16)
    moved = to_engine(b, Engine(), feeder)
    assert moved["pixel_values"].dtype == torch.float32 and [x.dtype for x in moved["boxes"]] == [torch.float32] * 2
    events[1].done = True  # a later copy finished first: its lease still waits for the earlier one's
    assert feeder.release_done() == 2 and int(la[0]) == 1 and int(lb[0]) == 1
    events[0].done = True
    assert feeder.release_done() == 0 and int(la[0]) == 0 and int(lb[0]) == 0
