"""The one home of collectives: every rank-spanning operation the loop, objectives, checkpoints and
evaluation need, each the identity on one process (no caller checks `is_initialized` itself).

    rank, world = world_info()
    totals = all_reduce_floats([loss_sum, count])            # sums over ranks (or op="max")
    parts = all_gather_object(cursor)                        # one entry per rank, rank order
    value = broadcast_object(value_on_rank0)                 # rank 0's value everywhere
    features = gather_with_grad(local)                       # [world * B, ...], gradient flows back
    scores = gather_uneven(mine)                             # rank order, row counts may differ
    barrier()

Why gather_with_grad is hand-written: gloo has no reduce-scatter, and torch.distributed.nn's
all_gather falls back to all_to_all, which gloo lacks too (OpenCLIP's gather_with_grad semantics).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """More than one rank is talking."""
    return world_info()[1] > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_floats(values: Sequence[float], op: str = "sum") -> list[float]:
    """Reduce a few floats over ranks in one float64 all-reduce: op "sum" or "max"."""
    values = [float(v) for v in values]
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (one all-reduce)."""
    return all_reduce_floats([1.0 if flag else 0.0], op="max")[0] > 0


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, from our own processes), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 keeping the gradient: backward sums every rank's gradient for our
    slice (all-reduce, then take the slice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # [B, E] -> [world * B, E]
        rank, world = world_info()
        ctx.rank, ctx.size = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [world * B, ...] in rank order, differentiable; the identity on one process.
    Every rank must pass the same B."""
    return _GatherWithGrad.apply(tensor) if is_distributed() else tensor


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [world * B, ...] in rank order, detached; every rank must pass the same shape."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] rows in rank order when the row counts differ (evaluation
    scores split by batches); detached. Two all-gathers: the lengths, then padded rows."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    buffer = tensor.new_zeros((longest, *tensor.shape[1:]))
    buffer[:tensor.shape[0]] = tensor
    parts = [torch.zeros_like(buffer) for _ in range(world)]
    dist.all_gather(parts, buffer.contiguous())
    return torch.cat([part[:int(n)] for part, n in zip(parts, lengths)])
