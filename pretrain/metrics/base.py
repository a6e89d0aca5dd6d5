"""The interface every metrics destination implements: `log` a record, `close` at the end.

A record is what the trainer logged once: its `kind` (train: a logged optimiser step; eval: a
validation pass; checkpoint: a save finished; bad_samples: the loader's cumulative counts), the
step, the Unix time, and a flat dict of values keyed as in pretrain/metrics/names.py. The
processor (pretrain/metrics/processor.py) reduces across ranks once and hands the same record to
every exporter, so a new destination (TensorBoard, W&B) is one subclass and one line where the
exporters are listed.
"""

from __future__ import annotations

from typing import Any, Mapping


class Exporter:
    """One destination of the metrics; the base class ignores everything, so a subclass overrides what it needs."""

    def log(self, step: int, values: Mapping[str, Any], *, kind: str = "train", timestamp: float = 0.0) -> None:
        """Record `values` of one `kind` record logged at `step` and Unix time `timestamp`."""

    def close(self) -> None:
        """Flush and release what the exporter holds; called once, after the last `log`."""
