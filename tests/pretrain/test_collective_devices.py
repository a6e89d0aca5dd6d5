"""Collectives pass tensors on the device the process group serves (STYLE.md), checked on CPU.

NCCL moves CUDA tensors only: a host tensor handed to one of its collectives raises, so a collective
that builds its tensor on the host breaks every multi-GPU run at its first call, while gloo on CPU
accepts it and no CPU test would notice. Here two gloo ranks drive the real call sites under NCCL's
rule, played with a stand-in for the accelerator:

- `pretrain.distributed.to_comm`, the one seam that places tensors on the communication device, marks
  its result as `OnAccelerator` (a CPU tensor subclass that torch operations propagate, so whatever is
  derived from a placed tensor stays marked);
- values a real run computes on the accelerator (losses, embeddings, scores) enter marked;
- the tensor collectives of `torch.distributed` reject any unmarked tensor (NCCL's "Tensors must be
  CUDA and dense"), and the object collectives reject objects holding marked tensors (a pickled CUDA
  tensor unpickles onto the sender's GPU).

Call sites: the finite check of `micro_step` (any_rank of a device flag), the preemption flag (any_rank
of a host bool), the metrics window reduction, the evaluator's totals and in-batch R@1 probe,
gather_uneven with host and device rows, ITC's gathers with their backward, and the checkpoint's object
collectives. Each must also give the values a plain reduction gives.
"""

from __future__ import annotations

import datetime
import math
import os
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

WORLD = 2
TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
)
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


class OnAccelerator(torch.Tensor):
    """A CPU tensor standing for one on this rank's accelerator."""


def on_accelerator(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(OnAccelerator)


def _walk(value):
    """Every tensor inside nested lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)


def _plain(value):
    """The same structure with marked tensors as plain views of the same memory (gloo writes through them)."""
    if isinstance(value, OnAccelerator):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def install_nccl_rule(dist) -> None:
    """Wrap torch.distributed's collectives with NCCL's device rule; route placement through the stand-in."""
    import pretrain.distributed as distributed

    for name in TENSOR_COLLECTIVES:
        real = getattr(dist, name)

        def tensor_collective(*args, _name=name, _real=real, **kwargs):
            host = [tuple(t.shape) for t in _walk((args, kwargs)) if not isinstance(t, OnAccelerator)]
            if host:
                raise AssertionError(
                    f"dist.{_name} got host tensors of shapes {host}: NCCL moves only tensors on "
                    f"the rank's CUDA device (place them with pretrain.distributed.to_comm)"
                )
            return _real(*_plain(list(args)), **{k: _plain(v) for k, v in kwargs.items()})

        setattr(dist, name, tensor_collective)
    for name in OBJECT_COLLECTIVES:
        real = getattr(dist, name)

        def object_collective(*args, _name=name, _real=real, **kwargs):
            if any(isinstance(t, OnAccelerator) for t in _walk((args, kwargs))):
                raise AssertionError(
                    f"dist.{_name} pickles a device tensor: it would unpickle onto the sender's "
                    f"GPU; gather device tensors with a tensor collective"
                )
            return _real(*args, **kwargs)

        setattr(dist, name, object_collective)
    distributed.to_comm = lambda tensor: on_accelerator(tensor.to("cpu"))


class _Engine:
    """micro_step's engine: returns `loss` as the total (on the accelerator) and counts backward/step."""

    def __init__(self, loss: float):
        self.loss, self.backwards, self.steps = loss, 0, 0

    def __call__(self, batch, progress):
        total = on_accelerator(torch.tensor(self.loss))
        return total, {"loss/total": total}

    def backward(self, total) -> None:
        self.backwards += 1

    def step(self) -> None:
        self.steps += 1


def _call_sites(rank: int) -> None:
    import torch.distributed as dist

    from pretrain.distributed import all_gather_object, any_rank, barrier, broadcast_object, gather_uneven
    from pretrain.evaluator import in_batch_recall_at_1
    from pretrain.metrics import MetricsProcessor
    from pretrain.objectives import Progress
    from pretrain.objectives.itc import itc_loss
    from pretrain.throughput import ThroughputMeter
    from pretrain.train import micro_step

    # The finite check: a non-finite loss on rank 1 makes both ranks skip; finite everywhere steps.
    engine = _Engine(math.nan if rank == 1 else 1.0)
    finite, _ = micro_step(engine, {}, Progress(0, 10))
    assert not finite and engine.backwards == engine.steps == 0
    engine = _Engine(2.0)
    finite, _ = micro_step(engine, {}, Progress(1, 10))
    assert finite and engine.backwards == engine.steps == 1

    # The preemption flag: a host bool, agreed after the step.
    assert any_rank(rank == 0) and not any_rank(False)

    # The metrics window: mean loss over ranks, samples summed.
    meter = ThroughputMeter(0)
    meter.batch(samples=4 + rank, wait_s=0.0)
    meter.step()
    values = MetricsProcessor([], rank=rank).log_training(1, 10, {"loss/itm": 2.0 * (rank + 1)}, 2, meter, {})
    assert values["loss/itm"] == pytest.approx((1.0 + 2.0) / 2)

    # gather_uneven: rows from the host and rows from the device, a different count per rank.
    for make in (lambda t: t, on_accelerator):
        rows = make(torch.arange(3 + rank, dtype=torch.float32).reshape(-1, 1) + 10 * rank)  # [3 + rank, 1]
        gathered = gather_uneven(rows)
        assert gathered.flatten().tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0]

    # The evaluator's in-batch R@1 probe: every caption finds its own image (embeddings on the device).
    generator = torch.Generator().manual_seed(rank)
    embs = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)  # [3, 8]
    ids = [f"r{rank}-{i}" for i in range(3)]
    recall = in_batch_recall_at_1([on_accelerator(embs)], [on_accelerator(embs.clone())], ids)
    assert recall == {"recall/t2i@1": 1.0, "recall/i2t@1": 1.0}

    # ITC: embeddings and codes gathered from every rank, the gradient all-reduced in backward.
    text = on_accelerator(torch.randn(2, 8, generator=generator)).requires_grad_()
    image = on_accelerator(torch.randn(2, 8, generator=generator)).requires_grad_()
    codes = on_accelerator(torch.tensor([2 * rank, 2 * rank + 1]))
    mask = on_accelerator(torch.ones(2, dtype=torch.bool))
    loss, _ = itc_loss(text, image, on_accelerator(torch.tensor(10.0)), codes, mask)
    loss.backward()
    assert torch.isfinite(text.grad).all() and torch.isfinite(image.grad).all()

    # The checkpoint's agreement: host objects only.
    barrier()
    assert broadcast_object({"failure": None} if rank == 0 else None) == {"failure": None}
    assert all_gather_object(rank) == [0, 1]
    assert dist.get_world_size() == WORLD


def _worker(rank: int, port: int, failures) -> None:
    import torch.distributed as dist

    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        install_nccl_rule(dist)
        _call_sites(rank)
    except BaseException:
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
        failures.close()
        failures.join_thread()  # the message is written before the process ends
        os._exit(1)  # the peer may wait in a collective: end without the group's teardown
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_collectives_pass_tensors_on_the_backends_device():
    ctx = mp.get_context("spawn")
    failures = ctx.Queue()
    context = mp.start_processes(_worker, args=(free_port(), failures), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    try:
        while not context.join(timeout=1):
            if not failures.empty() or time.monotonic() > deadline:
                break
    except mp.ProcessExitedException:
        pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    messages = []
    while not failures.empty():
        messages.append(failures.get())
    assert not messages, "\n".join(messages)
    assert time.monotonic() <= deadline, "the 2-rank run did not finish within 300 s"
    assert all(p.exitcode == 0 for p in context.processes), [p.exitcode for p in context.processes]


def test_comm_device_is_the_current_cuda_device_under_nccl(monkeypatch):
    """Which device the helper names for each backend (no group needs to exist: the queries are patched)."""
    import torch.distributed as dist

    import pretrain.distributed as distributed

    assert distributed.comm_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, expected in (
        ("nccl", torch.device("cuda", 3)),
        ("gloo", torch.device("cpu")),
        ("cpu:gloo,cuda:nccl", torch.device("cpu")),
        ("mpi", torch.device("cpu")),
    ):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, _b=backend: _b)
        assert distributed.comm_device() == expected, backend


def test_one_process_reductions_read_device_values_once():
    """Without a group the reductions are the identity, tensors and numbers alike, in order."""
    from pretrain.distributed import all_reduce_floats, any_rank

    assert all_reduce_floats([1, torch.tensor(2.5), True, torch.tensor([4.0])]) == [1.0, 2.5, 1.0, 4.0]
    assert all_reduce_floats([]) == []
    assert any_rank(~torch.isfinite(torch.tensor(math.inf)).all()) and not any_rank(torch.tensor(False))
