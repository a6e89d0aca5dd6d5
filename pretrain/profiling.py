"""A torch.profiler record of a few training steps, summarised as where the step time goes.

Why: throughput work starts from a profile, not from a guess. The summary answers the usual
questions in one JSON object per rank, on CPU and on a GPU alike:

- the step: host milliseconds per profiled step (and on a GPU, the share of it the device was busy);
- the loop's phases and the objective's terms (`relalign.*` ranges, below): milliseconds per step on
  the host and, on a GPU, of the device work launched inside them. A term's range covers its forward
  only (its encoder passes and its loss); backward is one range for all of them (on a GPU autograd
  runs it on its own thread, so that range shows host time only);
- the top operators by self host time on CPU; on a GPU the top kernels by device time; with calls
  per step;
- attention: the share of that time in attention operators or kernels (the fused SDPA kernels, or
  whatever a layer falls back to);
- host-device synchronisations: every `.item()` / `float()` / `bool()` of a tensor is an
  `aten::_local_scalar_dense`, counted per step by the innermost `relalign.*` range around it. On a
  GPU the host waits there for the device when the tensor lives on it (not for the loader's CPU
  tensors or the optimizer's CPU step counters), so on a GPU the figure that counts is
  `runtime_syncs_per_step` (the runtime's synchronisations, which every device read makes) with the
  share of step time the host spent blocked in them; on CPU the scalar reads show where a GPU run
  would wait.

    profile:
      enabled: true
      warmup_steps: 5   # run before recording: allocator, first-call paths, loader start-up
      steps: 3          # recorded

Output: `<run>/profile/rank<r>.json` (the summary) and, with `trace`, `rank<r>.trace.json` (open
in Perfetto or chrome://tracing). Profiling slows the recorded steps; do not read throughput
from a profiled run's metrics.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from data_tools.errors import check

PREFIX = "relalign."
"""The loop's own ranges (`torch.profiler.record_function`; about a microsecond each when nothing records)."""
DATA = PREFIX + "data"
"""Waiting for the next batch and moving it to the device."""
FORWARD = PREFIX + "forward"
"""The objective: every encoder pass and loss of a micro-batch (the terms' ranges nest inside)."""
FINITE_CHECK = PREFIX + "finite_check"
"""The agreement on a finite loss (one host sync and one all-reduce per micro-batch)."""
BACKWARD = PREFIX + "backward"
OPTIMIZER = PREFIX + "optimizer"
"""The engine's step: gradient reduction (ZeRO), clipping and the optimizer update."""
IAIS_LOSS = PREFIX + "iais_loss"
"""The IAIS loss from the attention blocks (the blocks themselves are computed in the encoder pass)."""


def term_range(name: str) -> str:
    """The range of one objective term's forward."""
    return f"{PREFIX}term.{name}"


ATTENTION = re.compile(r"scaled_dot_product|flash|fmha|efficient_attention|attention", re.IGNORECASE)
"""Operator and kernel names counted as attention."""
SCALAR_READ = "aten::_local_scalar_dense"
"""What every tensor -> Python number conversion calls: a host-device sync on an accelerator."""
RUNTIME_SYNCS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "hipStreamSynchronize",
    "hipDeviceSynchronize",
    "hipEventSynchronize",
    "hipMemcpy",
)
"""Runtime calls in which the host waits for the device (cudaMemcpy: the blocking copy, not the Async one)."""
TOP = 15


@dataclasses.dataclass
class ProfileConfig:
    """A torch.profiler record of a few training steps: a summary (and a trace) in <run>/profile/."""

    enabled: bool = False
    """Record `steps` optimizer steps after `warmup_steps`."""
    warmup_steps: int = 5
    """Steps run before recording (allocator, first-call paths, loader start-up); the last one runs
    with the profiler on and is discarded, as torch.profiler's schedule does."""
    steps: int = 3
    """Optimizer steps recorded and summarised."""
    trace: bool = True
    """Also write the Chrome trace (rank<r>.trace.json; tens of MB for a large model)."""

    def __post_init__(self) -> None:
        for name in ("enabled", "trace"):
            check(f"profile.{name}", getattr(self, name), isinstance(getattr(self, name), bool), "true or false")
        check(
            "profile.warmup_steps",
            self.warmup_steps,
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 1,
            "an integer >= 1",
        )
        check("profile.steps", self.steps, isinstance(self.steps, int) and self.steps >= 1, "an integer >= 1")


class StepProfiler:
    """Around the training loop: `step()` after every optimizer step; writes the summary when the
    recorded window closes (or at exit, when the run ends inside it)."""

    def __init__(self, config: ProfileConfig, run_dir: Path, rank: int, device_type: str):
        self.config, self.rank, self.device_type = config, rank, device_type
        self.folder = Path(run_dir) / "profile"
        self.summary: dict[str, Any] | None = None
        self._profiler: torch.profiler.profile | None = None
        self._recorded = 0  # steps completed inside the recorded window

    def __enter__(self) -> "StepProfiler":
        if self.config.enabled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            schedule = torch.profiler.schedule(
                wait=self.config.warmup_steps - 1, warmup=1, active=self.config.steps, repeat=1
            )
            self._profiler = torch.profiler.profile(
                activities=activities, schedule=schedule, on_trace_ready=self._write
            )
            self._profiler.__enter__()
        return self

    def step(self) -> None:
        if self._profiler is not None:
            if self._profiler.current_action in (
                torch.profiler.ProfilerAction.RECORD,
                torch.profiler.ProfilerAction.RECORD_AND_SAVE,
            ):
                self._recorded += 1
            self._profiler.step()

    def __exit__(self, *exc: Any) -> None:
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            profiler.__exit__(*exc)

    def _write(self, profiler: torch.profiler.profile) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # A run that ends inside the window: its last ProfilerStep holds the loop's exit, not a step.
        self.summary = summarise(profiler, self.device_type, steps=self._recorded)
        self.summary.update(rank=self.rank, window_complete=self._recorded == self.config.steps)
        (self.folder / f"rank{self.rank}.json").write_text(json.dumps(self.summary, indent=1) + "\n")
        if self.config.trace:
            profiler.export_chrome_trace(str(self.folder / f"rank{self.rank}.trace.json"))


def _times(event: Any) -> tuple[float, float, float, float]:
    """(host total, host self, device total, device self) in microseconds of a key_averages entry."""
    device_total = getattr(event, "device_time_total", None)
    device_self = getattr(event, "self_device_time_total", None)
    if device_total is None:  # torch before the device_* names
        device_total, device_self = getattr(event, "cuda_time_total", 0.0), getattr(event, "self_cuda_time_total", 0.0)
    return event.cpu_time_total, event.self_cpu_time_total, device_total or 0.0, device_self or 0.0


def _busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlapping kernels on several streams count once)."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        covered += stop - max(start, end)
        end = stop
    return covered


def _enclosing_range(event: Any) -> str:
    """The innermost `relalign.*` range around a profiler event, or "outside ranges"."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(PREFIX):
            return parent.name
        parent = parent.cpu_parent
    return "outside ranges"


def summarise(profiler: torch.profiler.profile, device_type: str, steps: int | None = None) -> dict[str, Any]:
    """The summary described in the module docstring, from a profiler whose window has closed;
    per-step figures divide by `steps` (default: the recorded ProfilerStep spans)."""
    averages = profiler.key_averages()
    on_device = device_type == "cuda"
    spans = [e for e in averages if e.key.startswith("ProfilerStep")]
    n = max(steps or sum(e.count for e in spans), 1)
    step_us = sum(_times(e)[0] for e in spans) / max(sum(e.count for e in spans), 1)
    if on_device:  # kernels, copies and sets: the device's own work (an operator's device time is its kernels')
        ops = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        ops = [e for e in averages if not e.key.startswith(("ProfilerStep", PREFIX))]
    self_index = 3 if on_device else 1
    total_self = sum(_times(e)[self_index] for e in ops) or 1.0
    top = sorted(ops, key=lambda e: _times(e)[self_index], reverse=True)[:TOP]
    ranges = {
        e.key: {
            "host_ms_per_step": round(_times(e)[0] / n / 1e3, 3),
            "calls_per_step": round(e.count / n, 2),
            **({"device_ms_per_step": round(_times(e)[2] / n / 1e3, 3)} if on_device else {}),
        }
        for e in sorted(averages, key=lambda e: e.key)
        if e.key.startswith(PREFIX)
    }
    attention = sum(_times(e)[self_index] for e in ops if ATTENTION.search(e.key))
    reads: dict[str, int] = {}
    for event in profiler.events():
        if event.name == SCALAR_READ:
            where = _enclosing_range(event)
            reads[where] = reads.get(where, 0) + 1
    summary: dict[str, Any] = {
        "device": device_type,
        "profiled_steps": n,
        "step_ms": round(step_us / 1e3, 3),
        "time_basis": "kernel time" if on_device else "operator self time on the host",
        "ranges": ranges,
        "attention_share": round(attention / total_self, 4),
        "scalar_reads_per_step": round(sum(reads.values()) / n, 2),
        "scalar_reads_per_step_by_range": {k: round(v / n, 2) for k, v in sorted(reads.items())},
        "top_ops": [
            {
                "name": e.key,
                "self_ms_per_step": round(_times(e)[self_index] / n / 1e3, 3),
                "share": round(_times(e)[self_index] / total_self, 4),
                "calls_per_step": round(e.count / n, 2),
            }
            for e in top
        ],
    }
    if on_device:
        runtime = [e for e in averages if e.key in RUNTIME_SYNCS]
        summary["runtime_syncs_per_step"] = round(sum(e.count for e in runtime) / n, 2)
        summary["host_blocked_share"] = round(sum(_times(e)[0] for e in runtime) / n / max(step_us, 1e-9), 4)
        kernels = [
            (e.time_range.start, e.time_range.end)
            for e in profiler.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
        step_spans = [
            (e.time_range.start, e.time_range.end) for e in profiler.events() if e.name.startswith("ProfilerStep#")
        ]
        window = (max(s for _, s in step_spans) - min(s for s, _ in step_spans)) if step_spans else 0.0
        summary["device_busy_share"] = round(_busy_union(kernels) / window, 4) if window > 0 else None
    return summary
