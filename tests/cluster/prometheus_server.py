"""A real Prometheus server for the tests, run with cluster/prometheus/prometheus.yml.

The only changes to the shipped configuration: the file-discovery folder of the `relalign` job
points at the test's folder, and scrape/refresh intervals are 1 s so a short job is seen rising.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import REPO, free_port


class Prometheus:
    def __init__(self, folder: Path, targets_dir: Path) -> None:
        self.folder, self.targets_dir = folder, targets_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Prometheus":
        source = REPO / "cluster" / "prometheus"
        config = yaml.safe_load((source / "prometheus.yml").read_text())
        # Fast scrapes: a tiny test job trains for a few seconds only, and "counters rise while it trains"
        # needs several samples of it (the timeout must not exceed the interval).
        config["global"].update(scrape_interval="250ms", scrape_timeout="200ms")
        for job in config["scrape_configs"]:
            job.update(scrape_interval="250ms", scrape_timeout="200ms")
            for sd in job.get("file_sd_configs", []):
                sd["files"] = [str(self.targets_dir / Path(f).name) for f in sd["files"]]
                sd["refresh_interval"] = "1s"
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "alerts.yml", self.folder / "alerts.yml")
        (self.folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.folder / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not become ready:\n" + (self.folder / "prometheus.log").read_text()[-3000:])

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
