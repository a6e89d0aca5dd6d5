"""Metrics: the processor and each exporter, over real HTTP: names, labels, values that move, ports,
Pushgateway, metrics.jsonl, the progress line, and a custom exporter receiving what was logged."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from data_tools.errors import ConfigError, UserError
from pretrain.metrics import (
    METRICS_FILE,
    Exporter,
    MetricsConfig,
    MetricsLogger,
    MetricsProcessor,
    ProgressExporter,
    names,
    read_jsonl,
)
from pretrain.throughput import ThroughputMeter
from tests.conftest import REPO, free_port, require


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape, parsed by prometheus_client's parser."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    labels = {"rank": "0", "run": "r1", **labels}
    return samples[(name, tuple(sorted(labels.items())))]


STEP = {
    "loss/itc": 2.5,
    "loss/itm": 0.7,
    "loss/mlm": 6.0,
    "loss/iais": 0.01,
    "loss/total": 9.21,
    "samples_per_second": 120.0,
    "step_seconds": 0.25,
    "data_wait_seconds": 0.02,
    "lr": 1e-4,
    "grad_norm": 1.5,
    "loss_scale": 1.0,
    "iais_weight": 0.0067,
    "isd/L": 0.3,
    "isd/V": 0.4,
}


def test_scrape_names_labels_and_values_that_move(tmp_path, port):
    config = MetricsConfig(port=port)
    with MetricsLogger(config, str(tmp_path), "r1", rank=0, local_rank=0) as metrics:
        assert metrics.url == f"http://127.0.0.1:{port}/metrics"
        metrics.log_step(10, {**STEP, "samples": 80, "nonfinite_steps": 0})
        metrics.add_bad_samples({"decode_error": 2})
        metrics.checkpoint_saved(1.25, ok=True)
        first = scrape(metrics.url)
        assert value(first, "relalign_steps_total") == 10
        assert value(first, "relalign_samples_total") == 80
        assert value(first, "relalign_loss", objective="itc") == 2.5
        assert value(first, "relalign_loss", objective="total") == 9.21
        assert value(first, "relalign_learning_rate") == pytest.approx(1e-4)
        assert value(first, "relalign_iais_weight") == pytest.approx(0.0067)
        assert value(first, "relalign_isd", direction="V", phase="train") == pytest.approx(0.4)
        assert value(first, "relalign_bad_samples_total", reason="decode_error") == 2
        assert value(first, "relalign_checkpoint_duration_seconds") == 1.25
        assert value(first, "relalign_checkpoints_total", outcome="ok") == 1
        assert value(first, "relalign_checkpoint_last_success_timestamp_seconds") > 1.7e9

        metrics.log_step(
            20,
            {
                **STEP,
                "loss/itc": 2.0,
                "samples": 160,
                "nonfinite_steps": 1,
                "loss/hinge": 0.125,
                "mining_seconds": 0.5,
                "candidates_per_second": 1200.0,
            },
        )
        metrics.add_bad_samples({"decode_error": 5, "empty_caption": 1})  # cumulative: +3 and +1
        metrics.checkpoint_saved(3.0, ok=False)
        metrics.log_eval(
            20,
            {
                "loss/itm": 0.5,
                "recall/t2i@1": 0.25,
                "recall/i2t@10": 0.75,
                "isd/L": 0.2,
                "relation/relation": 0.625,
                "isda": 0.3,
            },
        )
        second = scrape(metrics.url)
        assert value(second, "relalign_steps_total") == 20
        assert value(second, "relalign_samples_total") == 160
        assert value(second, "relalign_loss", objective="itc") == 2.0
        assert value(second, "relalign_loss", objective="hinge") == 0.125  # any loss/<name>, no list to edit
        assert value(second, "relalign_mining_seconds") == 0.5
        assert value(second, "relalign_mining_candidates_per_second") == 1200.0
        assert value(second, "relalign_nonfinite_steps_total") == 1
        assert value(second, "relalign_bad_samples_total", reason="decode_error") == 5
        assert value(second, "relalign_bad_samples_total", reason="empty_caption") == 1
        assert value(second, "relalign_checkpoints_total", outcome="failed") == 1
        assert value(second, "relalign_checkpoint_duration_seconds") == 3.0
        assert value(second, "relalign_eval_loss", objective="itm") == 0.5
        assert value(second, "relalign_eval_recall_ratio", direction="t2i", k="1") == 0.25
        assert value(second, "relalign_eval_recall_ratio", direction="i2t", k="10") == 0.75
        assert value(second, "relalign_isd", direction="L", phase="eval") == 0.2
        assert value(second, "relalign_eval_relation_accuracy_ratio", kind="relation") == 0.625
        assert value(second, "relalign_eval_isda") == 0.3
        names = {name for name, _ in second}
        assert all(n.startswith("relalign_") for n in names)
        assert {label for _, labels in second for label, _ in labels} >= {"rank", "run"}
    with pytest.raises(OSError):  # closed: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_loss_not_computed_in_a_logged_step_reads_nan_not_its_old_value(tmp_path, port):
    # objectives.sampling=per_batch: each step computes one drawn term (plus the regularisers)
    with MetricsLogger(MetricsConfig(port=port), str(tmp_path), "r1", rank=0, local_rank=0) as metrics:
        metrics.log_step(1, {"loss/itc": 2.5, "loss/iais": 0.1, "loss/total": 2.6})
        metrics.log_step(2, {"loss/mlm": 6.0, "loss/iais": 0.2, "loss/total": 6.2})
        samples = scrape(metrics.url)
        assert math.isnan(value(samples, "relalign_loss", objective="itc"))
        assert value(samples, "relalign_loss", objective="mlm") == 6.0
        assert value(samples, "relalign_loss", objective="iais") == pytest.approx(0.2)
        metrics.log_step(3, {"loss/itc": 2.4, "loss/iais": 0.3, "loss/total": 2.7})
        samples = scrape(metrics.url)
        assert value(samples, "relalign_loss", objective="itc") == pytest.approx(2.4)
        assert math.isnan(value(samples, "relalign_loss", objective="mlm"))


def test_jsonl_one_object_per_logged_step_on_rank_0(tmp_path, port):
    with MetricsLogger(MetricsConfig(port=port), str(tmp_path), "r1", rank=0, local_rank=0) as metrics:
        metrics.log_step(1, {**STEP, "samples": 8, "custom/thing": 3.0})
        metrics.add_bad_samples({"bad_utf8": 1})
        metrics.log_step(2, {**STEP, "samples": 16, "loss/total": float("nan")})
        metrics.log_eval(2, {"recall/t2i@5": 0.5})
        metrics.checkpoint_saved(0.5, ok=True)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: a NaN would not parse in other readers
    assert [r["kind"] for r in records] == ["train", "train", "eval", "checkpoint"]
    train = read_jsonl(tmp_path)
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["custom/thing"] == 3.0 and train[0]["loss/itc"] == 2.5 and train[0]["samples"] == 8
    assert train[1]["loss/total"] is None and train[1]["bad_samples/bad_utf8"] == 1
    assert read_jsonl(tmp_path, "eval")[0]["recall/t2i@5"] == 0.5
    assert "NaN" not in "".join(lines)


def test_other_ranks_write_no_jsonl_and_serve_on_port_plus_local_rank(tmp_path, port):
    config = MetricsConfig(port=port)
    with MetricsLogger(config, str(tmp_path), "r1", rank=3, local_rank=1) as metrics:
        assert metrics.url == f"http://127.0.0.1:{port + 1}/metrics"
        metrics.log_step(4, {"samples": 32})
        assert value(scrape(metrics.url), "relalign_steps_total", rank="3") == 4
    assert not (tmp_path / METRICS_FILE).exists()


def test_rank_0_only_endpoint(tmp_path, port):
    config = MetricsConfig(port=port, per_rank=False)
    with MetricsLogger(config, str(tmp_path), "r1", rank=1, local_rank=1) as other:
        assert other.url is None
        with MetricsLogger(config, str(tmp_path), "r1", rank=0, local_rank=0) as main:
            assert main.url == f"http://127.0.0.1:{port}/metrics"


def test_port_in_use_is_a_clear_error_or_the_next_free_port(tmp_path, port):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        with pytest.raises(UserError, match=rf"port {port} is in use on 127.0.0.1.*metrics.port_in_use=next") as err:
            MetricsLogger(MetricsConfig(port=port), str(tmp_path), "r1", rank=0, local_rank=0)
        assert int(err.value.exit_code) == 2 and "\n" not in str(err.value)
        with MetricsLogger(MetricsConfig(port=port, port_in_use="next"), str(tmp_path), "r1", 0, 0) as metrics:
            bound = int(metrics.url.rsplit(":", 1)[1].split("/")[0])
            assert bound > port
            metrics.log_step(1, {"samples": 1})
            assert value(scrape(metrics.url), "relalign_steps_total") == 1


def test_disabled_exporter_serves_nothing_but_keeps_jsonl(tmp_path):
    with MetricsLogger(MetricsConfig(enabled=False), str(tmp_path), "r1", 0, 0) as metrics:
        assert metrics.url is None
        metrics.log_step(1, {"samples": 4})
        assert metrics.push() is False
    assert read_jsonl(tmp_path)[0]["samples"] == 4


@pytest.mark.parametrize(
    "field, bad",
    [
        ("port", 70000),
        ("port", "9400"),
        ("port", True),
        ("port_in_use", "retry"),
        ("host", ""),
        ("push_interval_s", 0),
        ("push_interval_s", float("inf")),
        ("enabled", "yes"),
        ("pushgateway", ""),
    ],
)
def test_config_errors_name_field_value_and_allowed(field, bad):
    with pytest.raises(ConfigError) as err:
        MetricsConfig(**{field: bad})
    assert err.value.field == f"metrics.{field}"
    assert f"metrics.{field}={bad!r}" in str(err.value) and "expected" in str(err.value)


def test_unknown_bad_sample_reason_is_a_bug(tmp_path):
    with MetricsLogger(MetricsConfig(enabled=False, jsonl=False), str(tmp_path), "r1", 0, 0) as metrics:
        with pytest.raises(ValueError, match="unknown bad-sample reason"):
            metrics.add_bad_samples({"cosmic_ray": 1})


class Recorder(Exporter):
    """A destination written for the test: keeps every record it is handed."""

    def __init__(self):
        self.records: list[tuple[str, int, dict]] = []
        self.closed = 0

    def log(self, step, values, *, kind="train", timestamp=0.0):
        self.records.append((kind, step, dict(values)))

    def close(self):
        self.closed += 1


def test_a_custom_exporter_class_receives_every_logged_record(tmp_path):
    recorder = Recorder()
    config = MetricsConfig(enabled=False, jsonl=False)
    with MetricsLogger(config, str(tmp_path), "r1", rank=1, local_rank=0, extra=[recorder]) as metrics:
        metrics.log_step(3, {"loss/itc": 2.5, "samples": 24})
        metrics.add_bad_samples({"decode_error": 2})
        metrics.add_bad_samples({"decode_error": 2})  # unchanged totals: nothing new to say
        metrics.log_step(4, {"loss/itc": 2.0, "samples": 32})
        metrics.log_eval(4, {"recall/t2i@1": 0.25})
        metrics.checkpoint_saved(1.5, ok=False)
    assert recorder.records == [
        ("train", 3, {"loss/itc": 2.5, "samples": 24}),
        ("bad_samples", 3, {"bad_samples/decode_error": 2}),
        ("train", 4, {"loss/itc": 2.0, "samples": 32, "bad_samples/decode_error": 2}),
        ("eval", 4, {"recall/t2i@1": 0.25}),
        ("checkpoint", 4, {"checkpoint_seconds": 1.5, "checkpoint_ok": False}),
    ]
    assert recorder.closed == 1


def test_log_training_reduces_the_window_once_and_every_exporter_sees_the_same_values(tmp_path):
    """One process (world 1): the logged loss is sum / micro-batches; the progress line says it too."""
    first, second, stream = Recorder(), Recorder(), io.StringIO()
    meter = ThroughputMeter(start_step=0)
    meter.batch(8, 0.5)
    meter.step()
    with MetricsProcessor([first, ProgressExporter(stream), second]) as metrics:
        values = metrics.log_training(
            1, 10, {"loss/itm": 3.0, "loss/total": 5.0}, count=2, meter=meter, extra={"lr": 0.5}
        )
    assert values["loss/itm"] == 1.5 and values["loss/total"] == 2.5 and values["lr"] == 0.5
    assert values["total_steps"] == 10 and values["data_wait_seconds"] == 0.5
    assert first.records == second.records == [("train", 1, values)]
    line = stream.getvalue()
    assert line.startswith("step 1/10 | itm 1.5000 total 2.5000 | ") and " samples/s | data wait " in line


@pytest.mark.parametrize(
    "kind, key, expected",
    [
        ("train", "loss/itc", [("relalign_loss", {"objective": "itc"})]),
        ("eval", "loss/itc", [("relalign_eval_loss", {"objective": "itc"})]),
        ("eval", "recall/i2t@10", [("relalign_eval_recall_ratio", {"direction": "i2t", "k": "10"})]),
        ("eval", "recall/i2t@2", []),
        ("eval", "recall/t2i", []),
        ("train", "isd/V", [("relalign_isd", {"direction": "V", "phase": "train"})]),
        ("eval", "isd/L", [("relalign_isd", {"direction": "L", "phase": "eval"})]),
        ("train", "isd/X", []),
        ("eval", "relation/swap_att", [("relalign_eval_relation_accuracy_ratio", {"kind": "swap_att"})]),
        ("train", "step", [("relalign_steps_total", {}), ("relalign_last_step_timestamp_seconds", {})]),
        ("train", "lr", [("relalign_learning_rate", {})]),
        ("eval", "lr", []),
        ("train", "custom/thing", []),
        ("bad_samples", "bad_samples/empty_caption", [("relalign_bad_samples_total", {"reason": "empty_caption"})]),
        (
            "checkpoint",
            "checkpoint_ok",
            [("relalign_checkpoints_total", {}), ("relalign_checkpoint_last_success_timestamp_seconds", {})],
        ),
    ],
)
def test_one_table_maps_logged_keys_to_series_and_labels(kind, key, expected):
    assert [(r.series.name, dict(labels)) for r, labels in names.route(kind, key)] == expected


def test_series_names_follow_the_conventions():
    assert len({s.name for s in names.SERIES}) == len(names.SERIES)
    for series in names.SERIES:
        assert series.name.startswith("relalign_") and series.name.endswith("_total") == series.counter
    assert {r.series for r in names.ROUTES} == set(names.SERIES)  # every series is fed by some key


PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")


@pytest.fixture
def pushgateway(tmp_path):
    """A real Pushgateway on a free local port, persisting into the test's folder (not /var/lib)."""
    require(PUSHGATEWAY is not None, "no Pushgateway binary (apt: prometheus-pushgateway)")
    gw_port = free_port()
    gateway = subprocess.Popen(
        [
            PUSHGATEWAY,
            f"--web.listen-address=127.0.0.1:{gw_port}",
            f"--persistence.file={tmp_path / 'pushgateway.data'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{gw_port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)


GROUP = (("instance", ""), ("job", "relalign"), ("rank", "0"), ("run", "r1"))


def test_pushgateway_receives_interval_pushes(tmp_path, pushgateway):
    config = MetricsConfig(port=0, pushgateway=pushgateway, push_interval_s=0.2, jsonl=False)
    with MetricsLogger(config, str(tmp_path), "r1", rank=0, local_rank=0) as metrics:
        metrics.log_step(5, {"samples": 40, "loss/total": 1.5})
        pushed: dict = {}
        for _ in range(100):  # no explicit push: the background loop delivers while training goes on
            pushed = scrape(f"{pushgateway}/metrics")
            if ("relalign_steps_total", GROUP) in pushed:
                break
            time.sleep(0.1)
        assert pushed[("relalign_steps_total", GROUP)] == 5
        assert pushed[("relalign_loss", tuple(sorted(GROUP + (("objective", "total"),))))] == 1.5


def test_pushgateway_gets_a_final_push_at_close(tmp_path, pushgateway):
    config = MetricsConfig(port=0, pushgateway=pushgateway, push_interval_s=1000.0, jsonl=False)
    metrics = MetricsLogger(config, str(tmp_path), "r1", rank=0, local_rank=0)
    metrics.log_step(9, {"samples": 72})
    assert ("relalign_steps_total", GROUP) not in scrape(f"{pushgateway}/metrics")  # interval not reached
    metrics.close()
    assert scrape(f"{pushgateway}/metrics")[("relalign_steps_total", GROUP)] == 9


def test_push_failure_does_not_stop_training(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    config = MetricsConfig(port=0, pushgateway=dead, push_interval_s=1000.0, jsonl=False)
    metrics = MetricsLogger(config, str(tmp_path), "r1", 0, 0)
    metrics.log_step(1, {"samples": 1})
    assert metrics.push() is False
    metrics.log_step(2, {"samples": 2})
    assert value(scrape(metrics.url), "relalign_steps_total") == 2
    metrics.close()


# --- end to end: a real training run ---------------------------------------------------------------
PLANTED = {"decode_error": 1, "empty_caption": 1, "bad_utf8": 1}


@pytest.fixture
def planted_dataset(tmp_path) -> Path:
    """23 good samples and one bad sample per PLANTED reason, in 3 shards, with the synthetic tokenizer."""
    from tests.data_tools.test_loader import good, jpeg, write_dataset

    synthetic = tmp_path / "synthetic"
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "build", "synthetic", "--samples", "8", "--out", str(synthetic)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = [
        [(f"g{s}{i}", good(10 * s + i, caption="a red circle left of a blue square")) for i in range(8)]
        for s in range(3)
    ]
    shards[0].insert(3, ("bad_jpeg", {"jpg": b"\xff\xd8 not really", "txt": b"broken"}))
    shards[1].insert(5, ("empty", {"jpg": jpeg(99), "txt": b"   "}))
    shards[2][7:] = [("latin", {"jpg": jpeg(98), "txt": b"caf\xe9"})]
    root = write_dataset(tmp_path / "planted", shards)
    shutil.copytree(synthetic / "tokenizer", root / "tokenizer")
    return root


@pytest.mark.slow
@pytest.mark.multiprocess
def test_scrape_a_training_run_and_count_planted_bad_samples(tmp_path, planted_dataset, pushgateway, port):
    """Scrapes `python -m pretrain` while it trains (the step counter moves between scrapes); the final
    push and metrics.jsonl carry exactly the bad samples planted in the shards."""
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "pretrain",
        "--config",
        "configs/tiny.yaml",
        f"data.paths=[{planted_dataset}]",
        f"run.dir={run_dir}",
        "run.name=scraped",
        "data.batch_size=2",
        "data.image_size=32",
        "train.epochs=1",
        "train.log_every=1",
        f"metrics.port={port}",
        f"metrics.pushgateway={pushgateway}",
        "metrics.push_interval_s=1000",
        "checkpoint.at_end=false",
    ]
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(
            args, cwd=REPO, env=dict(environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT
        )
    url, steps_seen = f"http://127.0.0.1:{port}/metrics", []
    try:
        while proc.poll() is None:
            try:
                samples = scrape(url)
            except OSError:  # not serving yet, or already closed
                time.sleep(0.05)
                continue
            key = ("relalign_steps_total", (("rank", "0"), ("run", "scraped")))
            if key in samples and (not steps_seen or samples[key] != steps_seen[-1]):
                steps_seen.append(samples[key])
        assert proc.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(steps_seen) >= 2 and steps_seen == sorted(steps_seen), steps_seen  # values moved during the run
    final = scrape(f"{pushgateway}/metrics")
    group = (("instance", ""), ("job", "relalign"), ("rank", "0"))
    bad = {
        dict(labels)["reason"]: value
        for (name, labels), value in final.items()
        if name == "relalign_bad_samples_total" and dict(labels).get("run") == "scraped"
    }
    assert bad == PLANTED
    records = read_jsonl(run_dir)
    steps_total = final[("relalign_steps_total", tuple(sorted(group + (("run", "scraped"),))))]
    assert steps_total == records[-1]["step"] >= steps_seen[-1]
    assert {k[len("bad_samples/") :]: v for k, v in records[-1].items() if k.startswith("bad_samples/")} == PLANTED
    assert final[("relalign_samples_total", tuple(sorted(group + (("run", "scraped"),))))] == records[-1]["samples"] > 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_toy_objective_from_a_test_file_trains_and_reaches_metrics(tmp_path, pushgateway, port):
    """A new objective is one file: registered by a module named in `plugins`, configured as
    objectives.toy, trained on 2 ranks, its loss in metrics.jsonl and on the Prometheus endpoints."""
    from tests.pretrain.runs import base_args, build_synthetic, start_ranks, wait_all

    data = build_synthetic(tmp_path / "data", samples=32)
    run = tmp_path / "run"
    args = [a for a in base_args(data, run) if a != "metrics.enabled=false"]
    args += [
        "train.steps=2",
        "data.batch_size=4",
        "plugins=[tests.pretrain.toy_objective]",
        "objectives.toy.weight=2.0",
        "objectives.toy.target=0.25",
        f"metrics.port={port}",
        f"metrics.pushgateway={pushgateway}",
        "metrics.push_interval_s=1000",
    ]
    procs = start_ranks(2, args, free_port(), tmp_path / "logs")
    scraped: set[str] = set()
    while any(p.poll() is None for p in procs):  # scrape both ranks' endpoints while they train
        for rank in (0, 1):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port + rank}/metrics", timeout=2).read().decode()
            except OSError:
                continue
            if 'relalign_loss{objective="toy"' in body:
                scraped.add(f"rank{rank}")
        time.sleep(0.05)
    codes = wait_all(procs)
    logs = "".join((tmp_path / "logs" / f"rank{r}.log").read_text() for r in (0, 1))
    assert codes == [0, 0], logs[-3000:]
    records = read_jsonl(run)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss/toy"] > 0 for r in records)
    expected = sum(records[-1][k] * w for k, w in (("loss/itc", 1), ("loss/itm", 1), ("loss/mlm", 1), ("loss/toy", 2)))
    assert records[-1]["loss/total"] == pytest.approx(
        expected + records[-1]["loss/iais"] * records[-1]["iais_weight"], rel=1e-4
    )
    pushed = urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5).read().decode()
    for rank in (0, 1):  # the final push of each rank carries the toy loss
        assert any(
            'objective="toy"' in line and f'rank="{rank}"' in line and line.startswith("relalign_loss{")
            for line in pushed.splitlines()
        ), pushed[-2000:]
    assert scraped, "the toy loss never showed on a rank's live endpoint"
