"""The real command line (subprocesses): user mistakes are one `data_tools: error:` line on stderr
and exit code 2, never a traceback; `stream` is dispatched to the loader's command; the `relalign`
console script mirrors `python -m data_tools`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*argv: str, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*(exe or [sys.executable, "-m", "data_tools"]), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required"),
        (["build", "coco", "{tmp}/nowhere", "--out", "{tmp}/o"], "coco ROOT {tmp}/nowhere: no such folder"),
        (
            ["build", "synthetic", "--samples", "ten", "--out", "{tmp}/o"],
            "argument --samples: invalid int value: 'ten'",
        ),
        (["build", "folder", "{tmp}", "--shard-bytes", "lots", "--out", "{tmp}/o"], "argument --shard-bytes"),
        (["verify", "{tmp}"], "dataset.json: missing"),
        (["merge", "{tmp}"], "no build state to merge"),
    ],
)
def test_one_line_exit_2(tmp_path, argv, message):
    result = run(*(a.format(tmp=tmp_path) for a in argv))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("data_tools: error: ") and message.format(tmp=tmp_path) in lines[0]
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_build_and_verify_through_the_cli(tmp_path):
    out = tmp_path / "d"
    result = run("build", "synthetic", "--samples", "12", "--seed", "1", "--shard-samples", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"{out}: 12 samples in 3 shards, 0 rejected"
    result = run("verify", str(out))
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK")


def test_stream_is_dispatched_to_the_loader(tmp_path):
    result = run("stream", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m data_tools stream")
    result = run("stream", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("data_tools: error: ")


def test_relalign_console_script(tmp_path):
    script = shutil.which("relalign", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the relalign console script is not installed in this environment")
    result = run("data", "verify", str(tmp_path), exe=[script])
    assert (
        result.returncode == 2
        and result.stderr.strip()
        == f"data_tools: error: {tmp_path / 'dataset.json'}: missing "
        "(not a finished dataset: build it, or run merge after a parts build)"
    )
