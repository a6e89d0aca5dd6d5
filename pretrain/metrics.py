"""Training metrics, the one place for their names: a Prometheus endpoint, a Pushgateway, metrics.jsonl.

The trainer hands plain dicts (`log_step`, `log_eval`) and events (`add_bad_samples`,
`checkpoint_saved`) to one `MetricsLogger` per rank; this module maps the dict keys to Prometheus
series named after DESIGN.md 3 (prefix `relalign_`, base units, `_total` counters, `_seconds`,
labels `rank` and `run`) and writes the same values to `<run>/metrics.jsonl` on rank 0, so a run
can be followed live (Prometheus scrapes each rank) and read afterwards (one JSON object a line).

Series (every one also carries `rank` and `run`):

    relalign_steps_total                              optimiser steps done (counter)
    relalign_samples_total                            samples consumed, the trainer's cumulative count (counter)
    relalign_loss{objective}                          last training loss: every `loss/<name>` key (itc, itm,
                                                      mlm, iais, hinge, total, or a plugin term's name)
    relalign_samples_per_second                       throughput over the last logging interval
    relalign_step_seconds                             mean wall time of a step in the interval
    relalign_data_wait_seconds                        mean time a step waited for its batch
    relalign_learning_rate                            learning rate of the first parameter group
    relalign_grad_norm                                global gradient norm before clipping
    relalign_loss_scale                               dynamic loss scale (fp16; 1 otherwise)
    relalign_iais_weight                              lambda * s(p), the IAIS weight in force
    relalign_mining_seconds                           hard-negative mining time per micro-batch (finetuning)
    relalign_mining_candidates_per_second             candidates scored per second while mining (finetuning)
    relalign_nonfinite_steps_total                    steps skipped for a non-finite loss (counter)
    relalign_last_step_timestamp_seconds              Unix time of the last logged step (stall alerts)
    relalign_bad_samples_total{reason}                bad samples skipped by the loader (counter)
    relalign_checkpoint_duration_seconds              wall time of the last checkpoint save
    relalign_checkpoint_last_success_timestamp_seconds  Unix time of the last successful save
    relalign_checkpoints_total{outcome}               saves by outcome ok|failed (counter)
    relalign_eval_loss{objective}                     held-out losses
    relalign_eval_recall_ratio{direction,k}           retrieval recall R@k, t2i|i2t, k 1|5|10 (0..1)
    relalign_isd{direction,phase}                     IAIS symmetric KL, direction L|V, phase train|eval
    relalign_eval_relation_accuracy_ratio{kind}       relation sensitivity: true caption scored above its negative
    relalign_eval_isda                                ISDa over the annotated evaluation pairs

Why a registry per logger and not prometheus_client's global one: several loggers can live in one
process (tests, finetuning after pretraining) without "duplicated timeseries" errors.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server

from data_tools.errors import BAD_SAMPLE_REASONS, ConfigError, UserError
from pretrain.distributed import all_reduce_floats, world_info
from pretrain.throughput import ThroughputMeter, hms

log = logging.getLogger(__name__)

RECALL_DIRECTIONS = ("t2i", "i2t")
RECALL_KS = ("1", "5", "10")
ISD_DIRECTIONS = ("L", "V")
PORT_IN_USE = ("error", "next")
NEXT_PORT_TRIES = 100
"""With port_in_use=next, how many successive ports are tried before giving up."""
METRICS_FILE = "metrics.jsonl"

# log_step keys mapped onto plain gauges (key -> series name, help).
STEP_GAUGES = {
    "samples_per_second": ("relalign_samples_per_second", "Samples per second over the last logging interval."),
    "step_seconds": ("relalign_step_seconds", "Mean wall time of one optimiser step in the last interval."),
    "data_wait_seconds": ("relalign_data_wait_seconds", "Mean time a step waited for its batch in the last interval."),
    "lr": ("relalign_learning_rate", "Learning rate of the first parameter group."),
    "grad_norm": ("relalign_grad_norm", "Global gradient norm before clipping."),
    "loss_scale": ("relalign_loss_scale", "Dynamic loss scale (fp16); 1 in bf16 and fp32."),
    "iais_weight": ("relalign_iais_weight", "IAIS weight lambda * s(p) in force at this step."),
    "mining_seconds": ("relalign_mining_seconds", "Hard-negative mining time per micro-batch (finetuning)."),
    "candidates_per_second": ("relalign_mining_candidates_per_second",
                              "Candidates scored per second by hard-negative mining (finetuning)."),
}


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


class _Series:
    """Every Prometheus series of one logger, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry):
        base = ("rank", "run")

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, base + extra, registry=registry)

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, base + extra, registry=registry)

        self.steps = counter("relalign_steps_total", "Optimiser steps done.")
        self.samples = counter("relalign_samples_total", "Samples consumed: the trainer's cumulative count.")
        self.loss = gauge("relalign_loss", "Last logged training loss by objective.", "objective")
        self.step_gauges = {key: gauge(name, doc) for key, (name, doc) in STEP_GAUGES.items()}
        self.nonfinite = counter("relalign_nonfinite_steps_total", "Steps skipped because the loss was not finite.")
        self.last_step_time = gauge("relalign_last_step_timestamp_seconds", "Unix time of the last logged step.")
        self.bad_samples = counter("relalign_bad_samples_total", "Bad samples skipped by the loader.", "reason")
        self.checkpoint_duration = gauge("relalign_checkpoint_duration_seconds", "Wall time of the last checkpoint save.")
        self.checkpoint_success = gauge(
            "relalign_checkpoint_last_success_timestamp_seconds", "Unix time of the last successful checkpoint save."
        )
        self.checkpoints = counter("relalign_checkpoints_total", "Checkpoint saves by outcome.", "outcome")
        self.eval_loss = gauge("relalign_eval_loss", "Held-out loss by objective.", "objective")
        self.recall = gauge("relalign_eval_recall_ratio", "Retrieval recall R@k (0..1).", "direction", "k")
        self.isd = gauge("relalign_isd", "IAIS symmetric KL (ISD) by direction.", "direction", "phase")
        self.relation = gauge("relalign_eval_relation_accuracy_ratio",
                              "Share of (image, caption, negative) triples scored right, by negative kind.", "kind")
        self.isda = gauge("relalign_eval_isda", "ISDa: phrase-level relation disagreement on annotated pairs.")


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Infinity: a non-finite float is written as null (the key stays)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """One rank's metrics: Prometheus series, the HTTP endpoint, the Pushgateway loop, metrics.jsonl."""

    def __init__(self, config: MetricsConfig, run_dir: str, run_name: str, rank: int, local_rank: int):
        self.config, self.rank, self.run_name = config, rank, run_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._series = _Series(self.registry)
        self._labels = {"rank": str(rank), "run": run_name}
        self._world = world_info()[1]
        self._last_step = 0
        self._last_samples = 0.0
        self._last_nonfinite = 0.0
        self._loss_objectives: set[str] = set()  # objectives whose loss gauge has been set
        self._bad_counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = None
        self._stop = threading.Event()
        self._pusher: threading.Thread | None = None
        self.url: str | None = None
        self._jsonl = None
        if config.jsonl and rank == 0:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8", buffering=1)
        if config.enabled and (config.per_rank or rank == 0):
            self._serve(config.port + local_rank if config.per_rank and config.port else config.port)
        if config.enabled and config.pushgateway:
            self._pusher = threading.Thread(target=self._push_loop, name="metrics-push", daemon=True)
            self._pusher.start()

    # --- endpoint and push -------------------------------------------------------------------
    def _serve(self, port: int) -> None:
        """Bind the endpoint; a port in use is a UserError or, with port_in_use=next, the next port."""
        tries = NEXT_PORT_TRIES if self.config.port_in_use == "next" and port else 1
        for candidate in range(port, min(port + tries, 65536)):
            try:
                self._server, _ = start_http_server(candidate, addr=self.config.host, registry=self.registry)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    continue
                raise UserError(
                    f"metrics: cannot serve on {self.config.host}:{candidate} (metrics.host/metrics.port): "
                    f"{err.strerror or err}"
                ) from None
            bound = self._server.server_address[1]
            host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
            self.url = f"http://{host}:{bound}/metrics"
            return
        last = min(port + tries, 65536) - 1
        span = f"ports {port}..{last} are" if tries > 1 else f"port {port} is"
        raise UserError(
            f"metrics: {span} in use on {self.config.host} (rank {self.rank}; metrics.port={self.config.port}"
            f"{', per_rank: port + local rank' if self.config.per_rank else ''}): choose another metrics.port, "
            f"or set metrics.port_in_use=next"
        )

    def push(self) -> bool:
        """Push every series to the Pushgateway now (grouped by job, run and rank); False if it failed.

        A monitoring outage must not stop training, so failures are logged, not raised.
        """
        if not (self.config.enabled and self.config.pushgateway):
            return False
        try:
            push_to_gateway(self.config.pushgateway, job="relalign", registry=self.registry,
                            grouping_key=self._labels, timeout=10)
            return True
        except OSError as err:
            log.warning("metrics: push to %s failed: %s", self.config.pushgateway, err)
            return False

    def _push_loop(self) -> None:
        while not self._stop.wait(self.config.push_interval_s):
            self.push()

    # --- the trainer's calls -----------------------------------------------------------------
    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Record the training values of `step` (see the module docstring for the keys)."""
        s, labels = self._series, self._labels
        with self._lock:
            if step > self._last_step:
                s.steps.labels(**labels).inc(step - self._last_step)
                self._last_step = step
            if "samples" in values and values["samples"] > self._last_samples:
                s.samples.labels(**labels).inc(values["samples"] - self._last_samples)
                self._last_samples = values["samples"]
            if "nonfinite_steps" in values and values["nonfinite_steps"] > self._last_nonfinite:
                s.nonfinite.labels(**labels).inc(values["nonfinite_steps"] - self._last_nonfinite)
                self._last_nonfinite = values["nonfinite_steps"]
            logged = {key[5:] for key in values if key.startswith("loss/")}
            for objective in self._loss_objectives - logged:  # not computed this step (objectives.sampling=per_batch)
                s.loss.labels(objective=objective, **labels).set(math.nan)  # no stale value: a gap in the graph
            self._loss_objectives |= logged
            for key, value in values.items():
                if key.startswith("loss/"):
                    s.loss.labels(objective=key[5:], **labels).set(value)
                elif key in s.step_gauges:
                    s.step_gauges[key].labels(**labels).set(value)
                elif key.startswith("isd/") and key[4:] in ISD_DIRECTIONS:
                    s.isd.labels(direction=key[4:], phase="train", **labels).set(value)
            now = time.time()
            s.last_step_time.labels(**labels).set(now)
            bad = {f"bad_samples/{reason}": n for reason, n in sorted(self._bad_counts.items())}
        self._write({"kind": "train", "step": step, "time": round(now, 3), **values, **bad})

    def log_training(self, step: int, total_steps: int, loss_sums: dict[str, float], count: int,
                     meter: ThroughputMeter, extra: dict[str, float]) -> dict[str, float]:
        """Close a logging window: the mean of each summed log over micro-batches and ranks, the
        window's throughput (one all-reduce in all), plus `extra` (lr, grad norm, ...); records it
        and prints the progress line on rank 0. Every rank calls it at the same steps."""
        keys = sorted(loss_sums)
        reduced = all_reduce_floats([loss_sums[k] / max(count, 1) for k in keys] + [meter.samples, meter.wait_s])
        world = max(self._world, 1)
        values = {k: v / world for k, v in zip(keys, reduced[: len(keys)])}
        window = meter.close_window(reduced[len(keys)], reduced[len(keys) + 1] / world, step, total_steps)
        values.update({k: window[k] for k in ("samples_per_second", "step_seconds", "data_wait_seconds")}, **extra)
        self.log_step(step, values)
        if self.rank == 0:
            losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in values.items() if k.startswith("loss/"))
            print(f"step {step}/{total_steps} | {losses} | {window['samples_per_second']:.1f} samples/s | data wait "
                  f"{100 * window['data_wait_fraction']:.0f}% | eta {hms(window['eta_seconds'])}", file=sys.stderr, flush=True)
        return values

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        """Record a validation pass: "loss/<objective>", "recall/t2i@1|5|10", "recall/i2t@...", "isd/L|V"."""
        s, labels = self._series, self._labels
        with self._lock:
            for key, value in values.items():
                if key.startswith("loss/"):
                    s.eval_loss.labels(objective=key[5:], **labels).set(value)
                elif key.startswith("recall/"):
                    direction, _, k = key[7:].partition("@")
                    if direction in RECALL_DIRECTIONS and k in RECALL_KS:
                        s.recall.labels(direction=direction, k=k, **labels).set(value)
                elif key.startswith("isd/") and key[4:] in ISD_DIRECTIONS:
                    s.isd.labels(direction=key[4:], phase="eval", **labels).set(value)
                elif key.startswith("relation/") and value is not None:
                    s.relation.labels(kind=key[9:], **labels).set(value)
                elif key == "isda" and value is not None:
                    s.isda.labels(**labels).set(value)
        self._write({"kind": "eval", "step": step, "time": round(time.time(), 3), **values})

    def add_bad_samples(self, counts: dict[str, int]) -> None:
        """Cumulative bad-sample counts by reason (the loader's totals); the counters move by the difference."""
        with self._lock:
            for reason, total in counts.items():
                if reason not in BAD_SAMPLE_REASONS:
                    raise ValueError(f"unknown bad-sample reason {reason!r}; known: {BAD_SAMPLE_REASONS}")
                previous = self._bad_counts.get(reason, 0)
                if total > previous:
                    self._series.bad_samples.labels(reason=reason, **self._labels).inc(total - previous)
                    self._bad_counts[reason] = total

    def checkpoint_saved(self, seconds: float, ok: bool) -> None:
        """A checkpoint save finished (ok) or failed after `seconds`."""
        s, labels, now = self._series, self._labels, time.time()
        with self._lock:
            s.checkpoint_duration.labels(**labels).set(seconds)
            s.checkpoints.labels(outcome="ok" if ok else "failed", **labels).inc()
            if ok:
                s.checkpoint_success.labels(**labels).set(now)
        self._write({"kind": "checkpoint", "step": self._last_step, "time": round(now, 3),
                     "checkpoint_seconds": seconds, "checkpoint_ok": ok})

    def close(self) -> None:
        """Final push, stop the endpoint, close metrics.jsonl. Idempotent."""
        if self._pusher is not None:
            self._stop.set()
            self._pusher.join(timeout=self.config.push_interval_s + 15)
            self._pusher = None
            self.push()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            line = json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False)
            with self._lock:
                self._jsonl.write(line + "\n")


def read_jsonl(run_dir: str | os.PathLike, kind: str | None = "train") -> list[dict[str, Any]]:
    """The records of `<run>/metrics.jsonl` (of one `kind`: train | eval | checkpoint; None: all)."""
    path = Path(run_dir) / METRICS_FILE
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
