"""Parts + merge equals a one-process build; a killed build resumes without redoing finished shards
and ends byte-identical to an uninterrupted one; reruns are no-ops; a folder of another build is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.manifest import load_dataset
from data_tools.schema import DATASET_FILE, MANIFEST_FILE, REJECTED_FILE
from tests.data_tools.conftest import build

REPO = Path(__file__).resolve().parents[2]


def same_dataset(a: Path, b: Path) -> None:
    """Byte-identical index files and shards."""
    for name in (DATASET_FILE, MANIFEST_FILE, REJECTED_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    info, _ = load_dataset(a)
    for shard in info.shards:
        assert (a / shard.location).read_bytes() == (b / shard.location).read_bytes(), shard.location


def test_parts_then_merge_equals_one_build(tiny_coco, tmp_path, capsys):
    args = ["build", "coco", str(tiny_coco), "--shard-samples", "1", "--resize", "32"]
    assert build(*args, "--out", str(tmp_path / "one")) == 0
    parts = tmp_path / "parts"
    assert build(*args, "--out", str(parts), "--num-parts", "3", "--part", "2") == 0
    assert not (parts / DATASET_FILE).exists()
    capsys.readouterr()
    assert build("merge", str(parts)) == 3  # parts 0 and 1 are missing
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"data_tools: error: {parts}: 4 of 5 shards are not built yet (0, 1, 3, 4); finish every part, then merge"
    )
    assert build(*args, "--out", str(parts), "--num-parts", "3", "--part", "0", "--workers", "2") == 0
    assert build(*args, "--out", str(parts), "--num-parts", "3", "--part", "1") == 0
    assert build("merge", str(parts)) == 0
    same_dataset(tmp_path / "one", parts)
    assert build("merge", str(parts)) == 0  # already merged: nothing to do
    assert "already merged" in capsys.readouterr().err


def test_plan_once_then_parts_reuse_it(tiny_coco, tmp_path, monkeypatch, capsys):
    import data_tools.build

    args = ["build", "coco", str(tiny_coco), "--shard-samples", "2"]
    assert build(*args, "--out", str(tmp_path / "one")) == 0
    parts = tmp_path / "parts"
    assert build(*args, "--out", str(parts), "--num-parts", "2", "--plan-only", "--workers", "2") == 0
    assert "plan of 5 records in 3 shards" in capsys.readouterr().err
    assert len(list((parts / ".build").glob("plan-*.json"))) == 1 and not (parts / "shards").exists()

    def no_hashing(*_):
        raise AssertionError("the parts must reuse the saved plan")

    monkeypatch.setattr(data_tools.build, "plan_records", no_hashing)
    for part in ("0", "1"):
        assert build(*args, "--out", str(parts), "--num-parts", "2", "--part", part) == 0
    assert build("merge", str(parts)) == 0
    same_dataset(tmp_path / "one", parts)
    assert not (parts / ".build").exists()


def test_rerun_is_a_no_op_and_other_arguments_are_refused(tmp_path, capsys):
    out = tmp_path / "d"
    assert build("build", "synthetic", "--samples", "20", "--out", str(out)) == 0
    before = (out / DATASET_FILE).stat().st_mtime_ns
    assert build("build", "synthetic", "--samples", "20", "--out", str(out)) == 0
    assert (out / DATASET_FILE).stat().st_mtime_ns == before and "already complete" in capsys.readouterr().err
    assert build("build", "synthetic", "--samples", "21", "--out", str(out)) == 2
    assert "already holds a dataset built with other arguments" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    out = tmp_path / "killed"
    argv = ["build", "synthetic", "--samples", "1200", "--image-size", "224", "--shard-samples", "60", "--seed", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools", *argv, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    states = out / ".build"
    deadline = time.monotonic() + 120
    try:
        while len(list(states.glob("shard-*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (out / DATASET_FILE).exists(), "the build finished before it could be killed"
    done = sorted(states.glob("shard-*.json"))
    assert 3 <= len(done) < 20
    finished = {
        p.stem.removeprefix("shard-"): (out / "shards" / f"synthetic-{p.stem.removeprefix('shard-')}.tar") for p in done
    }
    stamps = {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in finished.items()}

    result = subprocess.run(
        [sys.executable, "-m", "data_tools", *argv, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"{20 - len(done)} shards built, {len(done)} already done" in result.stderr
    assert {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in finished.items()} == stamps  # not redone
    assert not list((out / "shards").glob(".*tmp*")) and not states.exists()

    fresh = tmp_path / "fresh"
    assert build(*argv, "--out", str(fresh), "--workers", "2") == 0
    same_dataset(fresh, out)
