"""Training metrics: one processor per rank fanning records out to exporters (one class per destination).

    names.py        the one table of series: Prometheus names, types, labels, and the logged keys feeding them
    base.py         `Exporter`: `log(step, values, kind=, timestamp=)` and `close()`
    prometheus.py   the registry of one rank and its HTTP endpoint
    pushgateway.py  the push loop for jobs that cannot be scraped
    jsonl.py        <run>/metrics.jsonl (rank 0) and `read_jsonl`
    progress.py     the progress line on stderr (rank 0)
    processor.py    `MetricsProcessor` (reduce across ranks once, fan out) and `MetricsLogger` (the
                    processor with the exporters a `MetricsConfig` asks for)

A new destination (TensorBoard, W&B) is one `Exporter` subclass, passed as `MetricsLogger(..., extra=[...])`
or added where `MetricsLogger` lists its exporters.
"""

from pretrain.metrics.base import Exporter
from pretrain.metrics.config import MetricsConfig
from pretrain.metrics.jsonl import METRICS_FILE, JsonlExporter, read_jsonl
from pretrain.metrics.processor import MetricsLogger, MetricsProcessor
from pretrain.metrics.progress import ProgressExporter
from pretrain.metrics.prometheus import PrometheusExporter
from pretrain.metrics.pushgateway import PushgatewayExporter

__all__ = [
    "METRICS_FILE",
    "Exporter",
    "JsonlExporter",
    "MetricsConfig",
    "MetricsLogger",
    "MetricsProcessor",
    "ProgressExporter",
    "PrometheusExporter",
    "PushgatewayExporter",
    "read_jsonl",
]
