"""Counting, on the CPU, the operations of a training step that would stop the host on a GPU.

    with HostSyncCounter() as syncs:
        micro_step(engine, batch, progress)
    syncs.events   # [SyncEvent(kind, op, where), ...]

Why a counter that runs on the CPU: a host synchronisation costs nothing on the CPU (the host is the
device), so a sync that creeps into the forward shows up only as a slower GPU step, and CI has no GPU.
What would sync is visible in the operations themselves, so this module watches every aten operation
(a `TorchDispatchMode`: it sees the ops of the forward, the autograd backward and the optimizer) and
every Python-level tensor call (a `TorchFunctionMode`: it sees which factory call had a `device=`,
`.tolist()`, `.to()`), and tells "device" tensors from "host" tensors the way a GPU run would:

- host tensors are the ones built inside the watched block from host data or without a device:
  `torch.tensor`, `torch.as_tensor`, `torch.asarray`, `torch.from_numpy`, and factories (`zeros`,
  `ones`, `arange`, `rand`, ...) called without `device=`; what is computed from host tensors only
  stays on the host;
- every other tensor is a device tensor: the step's inputs (the batch after `to_engine`, the
  parameters), whatever a factory made with `device=`, and everything computed from device tensors.

The kinds it counts (`SyncEvent.kind`), on device tensors only (a host tensor's `.item()` is free):

- `scalar read`: `.item()`, `float()`, `int()`, `bool()` of a tensor (aten `_local_scalar_dense`);
- `host read`: `.tolist()`, `.cpu()` (not `.numpy()`: on a GPU tensor it raises, so a call that runs
  is on a CPU-only path);
- `nonzero`, `masked_select`, `boolean index` (aten `index` / `index_put` with a bool or uint8 index),
  `multinomial`, `unique`, `repeat_interleave` without `output_size`, `equal`: output shapes or
  values the host must wait for;
- `host-to-device copy`: a host tensor (one with at least one dimension: a 0-dim host tensor is a
  scalar argument on a GPU too) that reaches device work, through `.to(device)`/`copy_` or as an
  input of an op over device tensors; counted once per tensor. Not counted: `.to(device,
  non_blocking=True)`, queued on the stream without waiting (from pinned memory, which
  `pretrain.transfer.to_device` stages).

It is a test instrument: slow (every op goes through Python twice) and not thread-safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

_SYNC_OPS = {
    aten._local_scalar_dense: "scalar read",
    aten.nonzero: "nonzero",
    aten.masked_select: "masked_select",
    aten.multinomial: "multinomial",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique",
    aten._unique: "unique",
    aten.equal: "equal",
}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_HOST_BUILDERS = {torch.tensor, torch.as_tensor, torch.asarray}
_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.range,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.empty_strided,
    torch.tril_indices,
    torch.triu_indices,
}
_HOST_READS = {torch.Tensor.tolist: "host read", torch.Tensor.cpu: "host read"}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class SyncEvent:
    kind: str
    """What would make the host wait (see the module docstring)."""
    op: str
    """The aten op or Python call."""
    where: str
    """The innermost frame of this repository's code ("file:line function"), or "autograd backward"."""

    def __str__(self) -> str:
        return f"{self.kind} ({self.op}) at {self.where}"


def _caller() -> str:
    """The innermost stack frame of the repository outside this module."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(_REPO) and path != os.path.abspath(__file__) and "/.venv/" not in path:
            return f"{os.path.relpath(path, _REPO)}:{frame.lineno} {frame.name}"
    return "autograd backward"


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class HostSyncCounter:
    """Context manager: the operations of the block that would synchronise host and device on a GPU
    (see the module docstring); `events` lists them in order, `count` is their number."""

    def __init__(self) -> None:
        self.events: list[SyncEvent] = []
        self._host: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._copied: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._dispatch = _Dispatch(self)
        self._function = _Function(self)
        self._from_numpy = None
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is counted or tracked inside (e.g. a stand-in for another library's work)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def count(self) -> int:
        return len(self.events)

    def report(self) -> str:
        return "\n".join(f"  {event}" for event in self.events) or "  (none)"

    # --- bookkeeping shared by the two modes -------------------------------------------------------
    def record(self, kind: str, op: Any) -> None:
        self.events.append(SyncEvent(kind, str(op), _caller()))

    def is_host(self, tensor: torch.Tensor) -> bool:
        return tensor in self._host

    def mark(self, tree: Any, host: bool) -> None:
        for tensor in _tensors(tree):
            if host:
                self._host[tensor] = True
            else:
                self._host.pop(tensor, None)

    def copied_to_device(self, tensor: torch.Tensor, op: Any) -> None:
        """A host tensor reaches device work: one copy per tensor (a GPU run would `.to()` it once)."""
        if tensor not in self._copied:
            self._copied[tensor] = True
            self.record("host-to-device copy", op)

    def __enter__(self) -> "HostSyncCounter":
        counter, original = self, torch.from_numpy

        def from_numpy(array):  # not a torch-function-overridable call: wrapped while counting
            out = original(array)
            counter.mark(out, host=True)
            return out

        self._from_numpy, torch.from_numpy = original, from_numpy
        self._function.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._dispatch.__exit__(*exc)
        self._function.__exit__(*exc)
        torch.from_numpy = self._from_numpy


class _Dispatch(TorchDispatchMode):
    """Every aten op: counts syncs on device tensors and carries host/device through the ops."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if counter._paused:
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        host = [t for t in inputs if counter.is_host(t)]
        on_device = len(host) < len(inputs)
        packet = func.overloadpacket
        if on_device:
            kind = _SYNC_OPS.get(packet)
            if packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) < 4:
                kind = "repeat_interleave"
            if packet in _INDEX_OPS:
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(
                    i is not None and i.dtype in (torch.bool, torch.uint8) and not counter.is_host(i) for i in indices
                ):
                    kind = "boolean index"
            if kind is not None and not (kind == "scalar read" and counter.is_host(args[0])):
                counter.record(kind, func)
            for tensor in host:
                if tensor.dim() > 0:
                    counter.copied_to_device(tensor, func)
        out = func(*args, **kwargs)
        counter.mark(out, host=bool(inputs) and not on_device)
        return out


def _target_is_device(counter: HostSyncCounter, args: tuple, kwargs: dict) -> bool:
    """Whether `Tensor.to(...)` names a device (a device, a device string, or a device tensor)."""
    for value in list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]:
        if isinstance(value, (torch.device, str)):
            return True
        if isinstance(value, torch.Tensor):
            return not counter.is_host(value)
    return False


class _Function(TorchFunctionMode):
    """Python-level calls: which tensors are host-built, explicit copies, host reads."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if counter._paused:
            return func(*args, **kwargs)
        if func in _HOST_READS and args and isinstance(args[0], torch.Tensor) and not counter.is_host(args[0]):
            counter.record(_HOST_READS[func], f"Tensor.{func.__name__}")
        if func is torch.Tensor.to and counter.is_host(args[0]) and _target_is_device(counter, args, kwargs):
            if not kwargs.get("non_blocking"):
                counter.copied_to_device(args[0], "Tensor.to")
            out = func(*args, **kwargs)
            counter.mark(out, host=False)
            return out
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu:
            counter.mark(out, host=True)  # read back once (counted above if it was a device tensor): host now
        elif func in _HOST_BUILDERS:
            if kwargs.get("device") is not None:
                counter.copied_to_device(out, func.__name__)  # built on the host, then copied
            else:
                counter.mark(out, host=True)
        elif func in _FACTORIES and kwargs.get("device") is None:
            counter.mark(out, host=True)
        return out
