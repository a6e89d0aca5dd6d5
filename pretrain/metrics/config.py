"""The `metrics` section of the configuration: which exporters run and where they listen."""

from __future__ import annotations

import dataclasses
import math

from data_tools.errors import ConfigError

PORT_IN_USE = ("error", "next")
NEXT_PORT_TRIES = 100
"""With port_in_use=next, how many successive ports are tried before giving up."""


@dataclasses.dataclass
class MetricsConfig:
    """Metrics export: a Prometheus endpoint per rank (or on rank 0), an optional Pushgateway, metrics.jsonl."""

    enabled: bool = True
    """Serve the Prometheus endpoint (and push, if a Pushgateway is set); metrics.jsonl follows `jsonl`."""
    host: str = "127.0.0.1"
    """Address the endpoint binds to; 127.0.0.1 keeps it off the network, 0.0.0.0 lets Prometheus scrape remotely."""
    port: int = 9400
    """Endpoint port of local rank 0; local rank r serves on port + r. 0 lets the system choose."""
    per_rank: bool = True
    """One endpoint per rank (port + local rank); false: rank 0 only."""
    port_in_use: str = "error"
    """What a port already in use does: error (stop with a clear message) or next (take the next free port)."""
    pushgateway: str | None = None
    """Pushgateway address (http://host:9091) for jobs that cannot be scraped; None: no push."""
    push_interval_s: float = 30.0
    """Seconds between pushes to the Pushgateway (and one more push at the end)."""
    jsonl: bool = True
    """Write <run>/metrics.jsonl (rank 0), one JSON object per logged step."""

    def __post_init__(self) -> None:
        for name in ("enabled", "per_rank", "jsonl"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"metrics.{name}", getattr(self, name), "true or false")
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError("metrics.host", self.host, "an address such as 127.0.0.1 or 0.0.0.0")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError("metrics.port", self.port, "an integer port 0..65535 (0: any free port)")
        if self.port_in_use not in PORT_IN_USE:
            raise ConfigError("metrics.port_in_use", self.port_in_use, " or ".join(PORT_IN_USE))
        if self.pushgateway is not None and (not isinstance(self.pushgateway, str) or not self.pushgateway.strip()):
            raise ConfigError("metrics.pushgateway", self.pushgateway, "null or an address such as http://host:9091")
        if (
            isinstance(self.push_interval_s, bool)
            or not isinstance(self.push_interval_s, (int, float))
            or not math.isfinite(self.push_interval_s)
            or self.push_interval_s <= 0
        ):
            raise ConfigError("metrics.push_interval_s", self.push_interval_s, "a number of seconds > 0")
