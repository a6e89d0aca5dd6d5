"""Prometheus: the series of pretrain/metrics/names.py in a registry, optionally served over HTTP.

Why a registry per exporter and not prometheus_client's global one: several loggers can live in one
process (tests, finetuning after pretraining) without "duplicated timeseries" errors.
"""

from __future__ import annotations

import errno
import math
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from data_tools.errors import UserError
from pretrain.metrics import names
from pretrain.metrics.base import Exporter
from pretrain.metrics.config import NEXT_PORT_TRIES


class PrometheusExporter(Exporter):
    """Every series of one rank in its own registry; serves it at `url` when given a port (None: no endpoint).

    Logged values that are cumulative counts (samples, bad samples, steps) move their counters by the
    increase, so a record may be repeated or arrive late without counting twice.
    """

    def __init__(
        self,
        rank: int,
        run_name: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        port_in_use: str = "error",
        port_hint: str = "",
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"rank": str(rank), "run": run_name}
        self._families: dict[str, Gauge | Counter] = {}
        for series in names.SERIES:
            kind = Counter if series.counter else Gauge
            self._families[series.name] = kind(
                series.name, series.doc, names.BASE_LABELS + series.labels, registry=self.registry
            )
        self._totals: dict[tuple, float] = {}  # last cumulative value seen per (series, labels)
        self._gap_sets: dict[str, set[tuple]] = {}  # label sets of gap series set so far, per series
        self._server = None
        self.url: str | None = None
        if port is not None:
            self._serve(rank, host, port, port_in_use, port_hint)

    def _serve(self, rank: int, host: str, port: int, port_in_use: str, hint: str) -> None:
        """Bind the endpoint; a port in use is a UserError or, with port_in_use=next, the next port."""
        tries = NEXT_PORT_TRIES if port_in_use == "next" and port else 1
        for candidate in range(port, min(port + tries, 65536)):
            try:
                self._server, _ = start_http_server(candidate, addr=host, registry=self.registry)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    continue
                raise UserError(
                    f"metrics: cannot serve on {host}:{candidate} (metrics.host/metrics.port): {err.strerror or err}"
                ) from None
            bound = self._server.server_address[1]
            self.url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/metrics"
            return
        last = min(port + tries, 65536) - 1
        span = f"ports {port}..{last} are" if tries > 1 else f"port {port} is"
        raise UserError(
            f"metrics: {span} in use on {host} (rank {rank}{hint}): choose another metrics.port, "
            f"or set metrics.port_in_use=next"
        )

    def log(self, step: int, values: Mapping[str, Any], *, kind: str = "train", timestamp: float = 0.0) -> None:
        touched: dict[str, set[tuple]] = {}
        for key, value in ({"step": step, **values} if kind == names.TRAIN else values).items():
            for route, labels in names.route(kind, key):
                if value is None:
                    continue
                self._apply(route, {**labels, **self._labels}, value, timestamp)
                if route.series.gap:
                    touched.setdefault(route.series.name, set()).add(tuple(sorted(labels.items())))
        for series in names.SERIES:
            if series.gap and any(r.series is series for r in names.ROUTES if r.kind == kind):
                now = touched.get(series.name, set())
                seen = self._gap_sets.setdefault(series.name, set())
                for labels in seen - now:  # not computed in this record: NaN, a gap in the graph
                    self._families[series.name].labels(**dict(labels), **self._labels).set(math.nan)
                seen |= now

    def _apply(self, route: names.Route, labels: dict[str, str], value: Any, timestamp: float) -> None:
        family = self._families[route.series.name]
        if route.how == names.SET:
            family.labels(**labels).set(value)
        elif route.how == names.TIME:
            family.labels(**labels).set(timestamp)
        elif route.how == names.TIME_IF_TRUE:
            if value:
                family.labels(**labels).set(timestamp)
        elif route.how == names.OUTCOME:
            family.labels(outcome="ok" if value else "failed", **labels).inc()
        elif route.how == names.TOTAL:
            key = (route.series.name, tuple(sorted(labels.items())))
            previous = self._totals.get(key, 0.0)
            if value > previous:
                family.labels(**labels).inc(value - previous)
                self._totals[key] = value
        else:
            raise ValueError(f"route {route} has an unknown way {route.how!r}")

    def close(self) -> None:
        """Stop the endpoint (the registry stays readable, e.g. for a final push)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
