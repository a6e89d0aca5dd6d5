"""Reused pixel buffers of loader workers (data_tools/pixel_pool.py): a buffer is refilled only after its
batch was released; a consumer that keeps batches without releasing them gets every batch intact; the
training loop's `to_engine` releases; batches are the same bytes with workers and pools as in process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from data_tools.loader import DataConfig, Loader
from data_tools.pixel_pool import DEFAULT_CAPACITY, PixelPool, release_pixels
from tests.pretrain.runs import PYTHON, REPO, env_for

SHAPE = (4, 8, 8, 3)


def test_a_buffer_is_reused_only_after_its_release():
    pool = PixelPool(capacity=2)
    a, lease_a = pool.take(SHAPE)
    b, lease_b = pool.take(SHAPE)
    assert a.data_ptr() != b.data_ptr() and int(lease_a[0]) == int(lease_b[0]) == 1
    c, lease_c = pool.take(SHAPE)  # both held, capacity reached: a fresh, unpooled segment
    assert lease_c is None and c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    release_pixels({"pixel_lease": lease_b})
    d, lease_d = pool.take(SHAPE)
    assert d.data_ptr() == b.data_ptr() and lease_d is lease_b and int(lease_d[0]) == 1
    e, _ = pool.take((2, 8, 8, 3))  # another shape never takes a released buffer of the wrong size
    assert e.shape == (2, 8, 8, 3)
    assert (pool.reused, pool.fresh) == (1, 4)
    assert a.is_shared() and b.is_shared() and lease_a.is_shared()


def test_release_is_idempotent_and_ignores_batches_without_lease():
    pool = PixelPool()
    _, lease = pool.take(SHAPE)
    batch = {"pixel_lease": lease}
    release_pixels(batch)
    release_pixels(batch)
    release_pixels({})
    assert "pixel_lease" not in batch and int(lease[0]) == 0


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool") / "scenes"
    subprocess.run(
        [PYTHON, "-m", "data_tools", "build", "synthetic", "--samples", "80", "--out", str(out)],
        cwd=REPO,
        env=env_for(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def pixels_of(scenes: Path, workers: int, release: bool) -> tuple[list[torch.Tensor], int]:
    """The pixel batches of one epoch (copies taken before releasing) and how many came with a lease."""
    loader = Loader(DataConfig(paths=[str(scenes)], batch_size=8, image_size=32, workers=workers))
    kept, leased = [], 0
    for batch in loader:
        leased += "pixel_lease" in batch
        kept.append(batch["pixel_uint8"].clone() if release else batch["pixel_uint8"])
        if release:
            release_pixels(batch)
    return kept, leased


@pytest.mark.timeout(300)
def test_worker_batches_equal_in_process_ones_whether_released_or_kept(scenes):
    """10 batches per epoch through a pool of 4: releasing lets the worker refill buffers (the copies
    taken before release stay right); keeping every batch unreleased makes it take fresh segments, so
    none of the kept batches is overwritten."""
    reference, leased = pixels_of(scenes, workers=0, release=False)
    assert len(reference) == 10 and leased == 0  # in process: nothing crosses processes, no pool
    for release, expected_leases in ((True, 10), (False, DEFAULT_CAPACITY)):
        got, leased = pixels_of(scenes, workers=1, release=release)
        assert leased == expected_leases  # kept unreleased: the pool fills, then fresh segments
        assert len(got) == len(reference)
        assert all(torch.equal(a, b) for a, b in zip(got, reference)), f"release={release}"


def test_to_engine_moves_the_pixels_then_releases_the_buffer():
    from pretrain.engine import to_engine

    class Engine:  # what to_engine reads of a DeepSpeed engine: its device and its module's dtype
        device = torch.device("cpu")
        module = torch.nn.Linear(2, 2)

    pool = PixelPool()
    pixels, lease = pool.take(SHAPE)
    pixels.fill_(7)
    batch = {"pixel_uint8": pixels, "pixel_lease": lease, "sample_mask": torch.ones(4, dtype=torch.bool)}
    moved = to_engine(batch, Engine())
    assert int(lease[0]) == 0 and "pixel_lease" not in moved and "pixel_uint8" not in moved
    pixels.fill_(200)  # the worker refills the buffer: the moved batch does not change
    assert torch.allclose(moved["pixel_values"], moved["pixel_values"][0:1].expand(4, -1, -1, -1))
    assert moved["pixel_values"].max() < 0  # 7/255 normalised: below every channel's mean
