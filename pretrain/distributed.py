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

The communication device: a backend moves tensors of one kind of device only (NCCL: CUDA tensors,
gloo: CPU tensors here), so every tensor collective below first puts its tensors on `comm_device()`
with `to_comm` (the current CUDA device under NCCL, the CPU otherwise) and hands results back on the
caller's device. Why one helper rather than a group with a backend per device ("cpu:gloo,cuda:nccl"):
the values we reduce mostly live on the GPU already (the finite check's flag, embeddings, scores),
so reducing them where they are costs one device-to-host read (the `.tolist()` that returns them),
where a gloo side channel would add a copy to the host before the collective and a second
communicator (TCP connections and threads per rank) beside the NCCL one DeepSpeed uses. DeepSpeed
starts one group with one backend (pretrain.dist_env.init_distributed); this module adapts to it.
Object collectives (`all_gather_object`, `broadcast_object`) pickle through a byte tensor that torch
puts on the current CUDA device under NCCL, which init_distributed sets to the local rank before the
group starts; pass them host objects only (a pickled CUDA tensor unpickles onto the sender's device).
"""

from __future__ import annotations

from typing import Any, Sequence, Union

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


def comm_device() -> torch.device:
    """The device whose tensors the default process group's backend moves: the current CUDA device
    under NCCL, the CPU under gloo, MPI, a "cpu:gloo,cuda:nccl" group or without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    if backend == "nccl" or ("nccl" in backend and "cpu:" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_comm(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on comm_device() (itself when it is there). A host-to-device copy is non-blocking (the
    driver stages the source); a device-to-host copy completes first, as the CPU backend reads it at once."""
    device = comm_device()
    return tensor.to(device, non_blocking=device.type != "cpu")


Number = Union[float, int, bool, torch.Tensor]


def _float64_vector(values: Sequence[Number], move) -> torch.Tensor:
    """[len(values)] float64 from numbers and one-element tensors, each moved by `move`; host numbers
    travel as one tensor, device tensors are never read on the host here."""
    host = [float(v) for v in values if not isinstance(v, torch.Tensor)]
    host_parts = iter(move(torch.tensor(host, dtype=torch.float64)).unbind()) if host else iter(())
    return torch.stack(
        [
            move(v.detach().to(torch.float64).reshape(())) if isinstance(v, torch.Tensor) else next(host_parts)
            for v in values
        ]
    )


def all_reduce_floats(values: Sequence[Number], op: str = "sum") -> list[float]:
    """Reduce a few numbers over ranks in one float64 all-reduce on the communication device: op "sum"
    or "max". Values may be Python numbers or one-element tensors on any device (e.g. a flag computed
    on the GPU); the one host read is the returned list."""
    if not values:
        return []
    if not is_distributed():
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        return _float64_vector(values, lambda t: t.to(device, non_blocking=device.type != "cpu")).tolist()
    vector = _float64_vector(values, to_comm)
    dist.all_reduce(vector, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return vector.tolist()


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank when `flag` is true on at least one (one all-reduce). A tensor flag (one
    element, e.g. `~torch.isfinite(loss).all()`) is reduced where it lives and read once afterwards."""
    return all_reduce_floats([flag], op="max")[0] > 0


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
        ctx.rank, ctx.size, ctx.device = rank, tensor.shape[0], tensor.device
        local = to_comm(tensor).contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = to_comm(grad).contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size].to(ctx.device)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [world * B, ...] in rank order, differentiable; the identity on one process.
    Every rank must pass the same B."""
    return _GatherWithGrad.apply(tensor) if is_distributed() else tensor


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [world * B, ...] in rank order, detached; every rank must pass the same shape."""
    if not is_distributed():
        return tensor
    local = to_comm(tensor).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] rows in rank order when the row counts differ (evaluation
    scores split by batches); detached. Two all-gathers: the lengths (read once on the host), then
    padded rows. Every rank must pass the same trailing shape."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    length = to_comm(torch.tensor([tensor.shape[0]], dtype=torch.long))
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    counts = torch.cat(lengths).tolist()
    local = to_comm(tensor.detach())
    buffer = local.new_zeros((max(counts), *tensor.shape[1:]))
    buffer[: tensor.shape[0]] = local
    parts = [torch.zeros_like(buffer) for _ in range(world)]
    dist.all_gather(parts, buffer)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(tensor.device)
