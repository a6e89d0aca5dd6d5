"""Fixtures of the `cluster` tests: a real local Slurm cluster, a real sshd, a real Prometheus.

Outside CI a missing program (or not being root, which the daemons need) skips these tests with the
reason; with CI=true it fails them (`require` in tests/conftest.py), so CI cannot pass without having
run them.
"""

from __future__ import annotations

import os

import pytest

from tests.cluster.slurm_cluster import SlurmCluster, missing_programs
from tests.conftest import require, require_programs


def require_root(what: str) -> None:
    require(os.geteuid() == 0, f"{what} needs root (it starts system daemons on private ports)")


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    """munged + slurmctld + 2 slurmd (relalign-n1, relalign-n2) on this host, for the whole session."""
    require_root("a local Slurm cluster")
    missing = missing_programs()
    require(not missing, f"Slurm programs absent: {', '.join(missing)} (apt: slurmctld slurmd slurm-client munge)")
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def sshd():
    """An sshd on 127.0.0.2 and 127.0.0.3 (port 2222) accepting a throwaway key; see sshd_server.py."""
    from tests.cluster.sshd_server import SshServer

    require_root("an sshd for the deepspeed launcher's pdsh runner")
    require_programs("sshd", "ssh", "ssh-keygen", "pdsh")
    server = SshServer().start()
    try:
        yield server
    finally:
        server.stop()
