"""The trainer's one metrics object: reduce across ranks once, then fan each record out to the exporters.

`MetricsProcessor` knows nothing about destinations: it turns the trainer's calls (`log_step`,
`log_training`, `log_eval`, `add_bad_samples`, `checkpoint_saved`) into records and hands each to
every exporter's `log`. `MetricsLogger` is the processor with the exporters a `MetricsConfig`
asks for: Prometheus (always, for its registry; served per rank or on rank 0), the Pushgateway,
metrics.jsonl (rank 0) and the progress line (rank 0).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping, Sequence

from data_tools.errors import BAD_SAMPLE_REASONS
from pretrain.distributed import all_reduce_floats, world_info
from pretrain.metrics import names
from pretrain.metrics.base import Exporter
from pretrain.metrics.config import MetricsConfig
from pretrain.metrics.jsonl import JsonlExporter
from pretrain.metrics.progress import ProgressExporter
from pretrain.metrics.prometheus import PrometheusExporter
from pretrain.metrics.pushgateway import PushgatewayExporter
from pretrain.throughput import ThroughputMeter

WINDOW_KEYS = ("samples_per_second", "step_seconds", "data_wait_seconds", "data_wait_fraction", "eta_seconds")


class MetricsProcessor:
    """Fans records out to `exporters`; the lock keeps records whole when a loader thread adds bad samples."""

    def __init__(self, exporters: Sequence[Exporter], rank: int = 0):
        self.exporters = list(exporters)
        self.rank = rank
        self._world = world_info()[1]
        self._step = 0
        self._bad_counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, step: int, values: Mapping[str, Any], kind: str = names.TRAIN) -> None:
        """Hand one record to every exporter, stamped with the current time."""
        now = time.time()
        with self._lock:
            for exporter in self.exporters:
                exporter.log(step, values, kind=kind, timestamp=now)

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """Record the training values of `step` (keys: pretrain/metrics/names.py); bad-sample totals are added."""
        self._step = max(self._step, step)
        bad = {f"bad_samples/{reason}": n for reason, n in sorted(self._bad_counts.items())}
        self.log(step, {**values, **bad}, names.TRAIN)

    def log_training(
        self,
        step: int,
        total_steps: int,
        loss_sums: dict[str, float],
        count: int,
        meter: ThroughputMeter,
        extra: dict[str, float],
    ) -> dict[str, float]:
        """Close a logging window: the mean of each summed log over micro-batches and ranks and the window's
        throughput (one all-reduce in all), plus `extra` (lr, grad norm, ...). Every rank calls it at the same
        steps; returns the values logged."""
        keys = sorted(loss_sums)
        reduced = all_reduce_floats([loss_sums[k] / max(count, 1) for k in keys] + [meter.samples, meter.wait_s])
        world = max(self._world, 1)
        values: dict[str, Any] = {k: v / world for k, v in zip(keys, reduced[: len(keys)])}
        window = meter.close_window(reduced[len(keys)], reduced[len(keys) + 1] / world, step, total_steps)
        values.update({k: window[k] for k in WINDOW_KEYS}, total_steps=total_steps, **extra)
        self.log_step(step, values)
        return values

    def log_eval(self, step: int, values: Mapping[str, Any]) -> None:
        """Record a validation pass: "loss/<objective>", "recall/t2i@1|5|10", "recall/i2t@...", "isd/L|V",
        "relation/<kind>", "isda"."""
        self.log(step, values, names.EVAL)

    def add_bad_samples(self, counts: Mapping[str, int]) -> None:
        """Cumulative bad-sample counts by reason (the loader's totals)."""
        for reason in counts:
            if reason not in BAD_SAMPLE_REASONS:
                raise ValueError(f"unknown bad-sample reason {reason!r}; known: {BAD_SAMPLE_REASONS}")
        grown = {r: n for r, n in counts.items() if n > self._bad_counts.get(r, 0)}
        if grown:
            self._bad_counts.update(grown)
            self.log(
                self._step, {f"bad_samples/{r}": n for r, n in sorted(self._bad_counts.items())}, names.BAD_SAMPLES
            )

    def checkpoint_saved(self, seconds: float, ok: bool) -> None:
        """A checkpoint save finished (ok) or failed after `seconds`."""
        self.log(self._step, {"checkpoint_seconds": seconds, "checkpoint_ok": ok}, names.CHECKPOINT)

    def close(self) -> None:
        """Close every exporter once, in order (the Pushgateway after Prometheus has its last values)."""
        exporters, self.exporters = self.exporters, []
        for exporter in exporters:
            exporter.close()

    def __enter__(self) -> "MetricsProcessor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetricsLogger(MetricsProcessor):
    """The processor with the exporters `config` asks for on this rank, plus any `extra` ones."""

    def __init__(
        self,
        config: MetricsConfig,
        run_dir: str,
        run_name: str,
        rank: int,
        local_rank: int,
        extra: Sequence[Exporter] = (),
    ):
        self.config = config
        serve = config.enabled and (config.per_rank or rank == 0)
        port = config.port + local_rank if config.per_rank and config.port else config.port
        hint = f"; metrics.port={config.port}{', per_rank: port + local rank' if config.per_rank else ''}"
        self.prometheus = PrometheusExporter(
            rank, run_name, config.host, port if serve else None, config.port_in_use, hint
        )
        exporters: list[Exporter] = [self.prometheus]
        self.pushgateway: PushgatewayExporter | None = None
        if config.enabled and config.pushgateway:
            self.pushgateway = PushgatewayExporter(
                self.prometheus.registry,
                config.pushgateway,
                config.push_interval_s,
                {"rank": str(rank), "run": run_name},
            )
            exporters.append(self.pushgateway)
        if config.jsonl and rank == 0:
            exporters.append(JsonlExporter(run_dir))
        if rank == 0:
            exporters.append(ProgressExporter())
        super().__init__(exporters + list(extra), rank)

    @property
    def url(self) -> str | None:
        """The Prometheus endpoint this rank serves, or None."""
        return self.prometheus.url

    @property
    def registry(self):
        return self.prometheus.registry

    def push(self) -> bool:
        """Push to the Pushgateway now; False when none is configured or the push failed."""
        return self.pushgateway.push() if self.pushgateway is not None else False
