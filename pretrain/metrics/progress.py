"""The progress line on stderr: step, losses, throughput, data-wait share and ETA of each logged step."""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping, TextIO

from pretrain.metrics import names
from pretrain.metrics.base import Exporter
from pretrain.throughput import hms


class ProgressExporter(Exporter):
    """Prints one line per train record that carries the window's `total_steps` (from `log_training`)."""

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream

    def log(self, step: int, values: Mapping[str, Any], *, kind: str = "train", timestamp: float = 0.0) -> None:
        if kind != names.TRAIN or "total_steps" not in values:
            return
        losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in values.items() if k.startswith("loss/"))
        wait = values.get("data_wait_fraction", math.nan)
        print(
            f"step {step}/{values['total_steps']} | {losses} | {values.get('samples_per_second', math.nan):.1f} "
            f"samples/s | data wait {100 * wait:.0f}% | eta {hms(values.get('eta_seconds', math.inf))}",
            file=self._stream or sys.stderr,
            flush=True,
        )
