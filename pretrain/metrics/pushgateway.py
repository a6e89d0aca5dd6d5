"""Pushgateway: a background thread pushes a registry every interval, and once more at close.

For jobs Prometheus cannot scrape (short runs, nodes behind a firewall). Pushes are grouped by
job `relalign`, `run` and `rank`. A monitoring outage must not stop training, so a failed push is
logged, not raised.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, push_to_gateway

from pretrain.metrics.base import Exporter

log = logging.getLogger(__name__)


class PushgatewayExporter(Exporter):
    """Pushes `registry` (filled by a PrometheusExporter) to `address` every `interval_s` seconds."""

    def __init__(self, registry: CollectorRegistry, address: str, interval_s: float, grouping: dict[str, str]):
        self.registry, self.address, self.interval_s, self.grouping = registry, address, interval_s, grouping
        self._stop = threading.Event()
        self._thread: threading.Thread | None = threading.Thread(target=self._loop, name="metrics-push", daemon=True)
        self._thread.start()

    def push(self) -> bool:
        """Push every series now; False if it failed."""
        try:
            push_to_gateway(
                self.address, job="relalign", registry=self.registry, grouping_key=self.grouping, timeout=10
            )
            return True
        except OSError as err:
            log.warning("metrics: push to %s failed: %s", self.address, err)
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.push()

    def close(self) -> None:
        """Stop the loop and push the final values."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=self.interval_s + 15)
            self._thread = None
            self.push()
