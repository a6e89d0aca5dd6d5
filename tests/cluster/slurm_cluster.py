"""A real two-node Slurm cluster on this host, for the `cluster` tests (Debian's Slurm 22.05, as root).

munged with its own key and socket, one slurmctld and two slurmd (`slurmd -N <name>`), all in a
temporary folder with private ports, started here and stopped by the PIDs started here. Why each
setting (verified on Debian 12):
- `AuthInfo=socket=...,cred_expire=10`: without the short expiry a requeued job waits 120 s before
  it may start again.
- proctrack/linuxproc, task/none, no accounting, no job completion log: nothing outside the folder
  (no cgroups, no database) is needed.
- Both nodes have `NodeHostname=` this host, `NodeAddr=127.0.0.1` and their own `Port=`; their names
  (NODES) must resolve, which /etc/hosts does (NODE_HOSTS: .ci/run adds the lines, and `ensure_hosts`
  adds them when missing and we are root). Each name maps to its own loopback address, so the two
  "nodes" can bind the same metrics port, as two real nodes would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODES = ("relalign-n1", "relalign-n2")
NODE_HOSTS = {"relalign-n1": "127.0.0.2", "relalign-n2": "127.0.0.3"}
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
START_TIMEOUT_S = 60


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def ensure_hosts(path: Path = Path("/etc/hosts")) -> None:
    """Add `ADDRESS NAME` for every node whose name does not resolve yet (idempotent; needs root)."""
    missing = [name for name in NODES if not _resolves(name)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(
            f"node names {missing} do not resolve; add to {path}: " + "; ".join(f"{NODE_HOSTS[n]} {n}" for n in missing)
        )
    text = path.read_text()
    lines = "".join(f"{NODE_HOSTS[n]} {n}\n" for n in missing)
    path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + lines)


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged + slurmctld + 2 slurmd; `env` is what the Slurm commands need (SLURM_CONF)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="relalign-slurm-"))
        self.root.chmod(0o755)  # munged refuses a socket folder others cannot reach
        self.conf = self.root / "slurm.conf"
        self.pids: list[int] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]  # a test run inside a Slurm job must not leak that job's variables

    # --- life -------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        ensure_hosts()
        try:
            self._start_munge()
            ctld_port, *node_ports = _free_ports(1 + len(NODES))
            self._write_conf(ctld_port, node_ports)
            self._spawn([_program("slurmctld"), "-f", str(self.conf)], self.root / "slurmctld.pid")
            for name in NODES:
                (self.root / "spool" / name).mkdir(parents=True)
                self._spawn([_program("slurmd"), "-N", name, "-f", str(self.conf)], self.root / f"slurmd-{name}.pid")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)
        self.socket = munge / "munge.socket"
        key = munge / "munge.key"
        subprocess.run([_program("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True)
        key.chmod(0o400)
        self._spawn(
            [
                _program("munged"),
                "--socket",
                str(self.socket),
                "--key-file",
                str(key),
                "--pid-file",
                str(munge / "munged.pid"),
                "--log-file",
                str(munge / "munged.log"),
                "--seed-file",
                str(munge / "munged.seed"),
                "--force",
            ],
            munge / "munged.pid",
        )

    def _write_conf(self, ctld_port: int, node_ports: list[int]) -> None:
        host = socket.gethostname()
        r = self.root
        lines = [
            "ClusterName=relalign-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "MinJobAge=300",
            "KillWait=10",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
        ]
        for name, port in zip(NODES, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 State=UNKNOWN")
        lines.append(
            f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
        )
        (r / "state").mkdir()
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, cmd: list[str], pid_file: Path) -> None:
        """Run a daemon that forks itself; remember the PID it writes."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}" + self.logs())
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text().strip().isdigit():
                self.pids.append(int(pid_file.read_text().strip()))
                return
            time.sleep(0.05)
        raise RuntimeError(f"{cmd[0]} wrote no {pid_file}" + self.logs())

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        out = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            out = proc.stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle within {START_TIMEOUT_S} s: {out!r}" + self.logs())

    def stop(self) -> None:
        """SIGTERM the daemons started here (newest first), then SIGKILL what is left; delete the folder."""
        for pid in reversed(self.pids):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids):
            time.sleep(0.1)
        for pid in self.pids:
            _signal(pid, signal.SIGKILL)
        self.pids.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- use --------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [_program(cmd[0]), *cmd[1:]],
            env=kw.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def job_field(self, job_id: str, field: str) -> str | None:
        """One `Field=value` of `scontrol show job` (None once the job is forgotten)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        for item in proc.stdout.split():
            if item.startswith(field + "="):
                return item.split("=", 1)[1]
        return None

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("munge/*.log")):
            parts.append(f"\n--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "".join(parts)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
