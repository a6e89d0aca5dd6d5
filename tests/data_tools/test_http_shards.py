"""Shards listed in dataset.json as http:// URLs, served by a real HTTP server on loopback.

Two ranks stream the remote dataset exactly once; a connection dropped in the middle of a shard is
resumed with a Range request (data_tools.remote) and loses nothing; a server that cannot resume
makes the rest of that shard bad samples with a reason (never a silent loss); a cut-and-resume over
HTTP gives the batches of an uninterrupted pass; `verify` checks remote shards' sizes and hashes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.loader import merge_rank_cursors
from tests.data_tools.shard_server import ShardServer
from data_tools.builders.synthetic import scene_key
from tests.data_tools.test_loader import batches_equal, config, real_keys, run_ranks

SAMPLES, SHARD_SAMPLES = 48, 8
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("http") / "local"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "build",
            "synthetic",
            "--samples",
            str(SAMPLES),
            "--shard-samples",
            str(SHARD_SAMPLES),
            "--out",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture
def served(built, tmp_path):
    """(server over the built dataset's folder, a dataset folder whose dataset.json lists URLs)."""
    server = ShardServer(built).start()
    remote = tmp_path / "remote"
    remote.mkdir()
    for name in ("manifest.parquet", "rejected.jsonl", "tokenizer"):
        source = built / name
        if source.is_dir():
            shutil.copytree(source, remote / name)
        elif source.exists():
            shutil.copy(source, remote / name)
    info = json.loads((built / "dataset.json").read_text())
    for shard in info["shards"]:
        shard["location"] = f"{server.url}/{shard['location']}"
    (remote / "dataset.json").write_text(json.dumps(info))
    try:
        yield server, remote
    finally:
        server.stop()


def allowed(cfg, server):
    """The loader config with the server's URLs allowed (a dataset.json URL is fetched only under an allowed prefix)."""
    cfg.remote_allow = [f"{server.url}/"]
    return cfg


def all_keys() -> list[str]:
    return sorted(scene_key(0, i) for i in range(SAMPLES))


def shard_path(i: int) -> str:
    return f"/shards/synthetic-{i:06d}.tar"


def test_two_ranks_stream_remote_shards_exactly_once_through_a_dropped_connection(served, caplog):
    server, remote = served
    server.drops[shard_path(2)] = 9000  # cut inside the shard's third sample
    ranks = run_ranks(allowed(config(remote), server), world=2)
    assert sorted(k for r in ranks for k in real_keys(r)) == all_keys()
    assert all(r[-1]["bad_samples"] == {} for r in ranks)
    assert (shard_path(2), "bytes=9000-") in server.requests  # resumed where it was cut
    assert shard_path(2) not in server.drops
    assert "resuming (attempt 1 of" in caplog.text


def test_without_range_support_the_rest_of_the_shard_is_bad_with_a_reason(built, tmp_path):
    server = ShardServer(built, ranges=False).start()
    try:
        from data_tools.shard_reader import ShardReader
        from data_tools.trust import Allowed
        from data_tools.errors import BadSample

        server.drops[shard_path(0)] = 9000
        reader = ShardReader([Allowed(f"{server.url}{shard_path(0)}")])  # as data_tools.trust passes it
        got, bad = [], []
        for index in range(SHARD_SAMPLES):
            try:
                got.append(reader.fetch(0, index)["__key__"])
            except BadSample as err:
                bad.append(str(err))
        reader.close()
    finally:
        server.stop()
    assert got == [scene_key(0, i) for i in range(len(got))] and 0 < len(got) < SHARD_SAMPLES
    assert len(bad) == SHARD_SAMPLES - len(got)
    assert "did not resume at byte 9000" in bad[0] and shard_path(0) in bad[0]


def test_cut_and_resume_over_http_equals_one_pass(served):
    server, remote = served
    cfg = allowed(config(remote), server)
    full = run_ranks(cfg, world=2)
    server.drops[shard_path(4)] = 5000
    first = run_ranks(cfg, world=2, limit=2)
    cursor = json.loads(json.dumps(merge_rank_cursors([r[-1]["cursor"] for r in first])))
    rest = run_ranks(cfg, world=2, cursor=cursor)
    for rank in range(2):
        assert len(first[rank]) + len(rest[rank]) == len(full[rank])
        assert all(batches_equal(a, b) for a, b in zip(first[rank] + rest[rank], full[rank]))


def test_verify_checks_remote_shards_through_a_drop_and_finds_a_changed_byte(served):
    server, remote = served
    server.drops[shard_path(1)] = 7000
    verify = [sys.executable, "-m", "data_tools", "verify", str(remote), "--allow-remote", f"{server.url}/"]
    proc = subprocess.run(verify, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (shard_path(1), "bytes=7000-") in server.requests and "OK" in proc.stdout
    server.corrupt.add(shard_path(3))
    proc = subprocess.run(verify, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "synthetic-000003.tar" in proc.stdout, proc.stdout + proc.stderr
