"""bench/gpu_check.sh's smoke mode as its CPU dry run: every stage runs (imports, data, one training step), the
results come as JSON lines in order, and the output folder stays within the file limit of the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
MAX_OUT_FILES = 8


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_mode_runs_one_training_step_on_cpu(tmp_path):
    out = tmp_path / "out"
    # BUDGET_S: the GPU machine's 60 s, with room for a CPU shared by other jobs
    env = {
        **os.environ,
        "GPU_CHECK_CPU": "1",
        "GPU_CHECK_MODE": "smoke",
        "BUDGET_S": "150",
        "PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=240
    )
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [x.get("stage", x.get("run")) for x in lines] == ["imports", "smoke", "done"], lines
    assert not [x for x in lines if "error" in x], lines
    assert lines[0]["missing"] == [] and lines[1]["exit_code"] == 0 and lines[1]["final_loss_total"] is not None
    written = sorted(p.name for p in out.iterdir())
    assert written == ["gpu_check.jsonl", "gpu_check.log"] and lines[-1]["out_files"] == len(written) <= MAX_OUT_FILES
    assert [json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines()] == lines
    assert not list(tmp_path.glob("relalign-gpu.*"))  # its work folder is removed
