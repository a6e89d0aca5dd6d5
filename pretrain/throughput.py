"""Throughput of a logging window: samples per second, data wait and step time, and the run's ETA.

The loop only tells what happened (`batch(samples, wait_s)` per micro-batch, `step()` per optimiser
step); `MetricsLogger.log_training` reduces the window over ranks and turns it into metrics.
"""

from __future__ import annotations

import math
import time


class ThroughputMeter:
    def __init__(self, start_step: int):
        self.start_step = start_step
        self.run_start = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.window_start = time.perf_counter()
        self.samples, self.wait_s, self.steps = 0, 0.0, 0

    def batch(self, samples: int, wait_s: float) -> None:
        """A micro-batch with `samples` real samples arrived after waiting `wait_s` for the loader."""
        self.samples += int(samples)
        self.wait_s += wait_s

    def step(self) -> None:
        self.steps += 1

    def close_window(
        self, samples_all_ranks: float, wait_all_ranks_mean: float, step: int, total_steps: int
    ) -> dict[str, float]:
        """The window's rates (samples summed over ranks, wait averaged over ranks), then a new window."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        steps = max(self.steps, 1)
        done = step - self.start_step
        rate = done / max(time.perf_counter() - self.run_start, 1e-9)
        values = {
            "samples_per_second": samples_all_ranks / elapsed,
            "step_seconds": elapsed / steps,
            "data_wait_seconds": wait_all_ranks_mean / steps,
            "data_wait_fraction": wait_all_ranks_mean / elapsed,
            "eta_seconds": (total_steps - step) / rate if rate > 0 else float("inf"),
        }
        self._reset()
        return values


def hms(seconds: float) -> str:
    """h:mm:ss, or ? for an unknown duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
