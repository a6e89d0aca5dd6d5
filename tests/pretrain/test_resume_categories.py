"""A run keeps its box categories across a resume (they are saved in every checkpoint): an MRC head
trained on 32 classes resumes on data whose dataset.json lists 33, with the same class indices, and
a checkpoint that does not fit the model the configuration builds is one clear error (exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.pretrain.runs import PYTHON, REPO, RUN_TIMEOUT_S, base_args, build_synthetic, env_for, train_records

pytestmark = pytest.mark.slow
SETTINGS = (
    "data.batch_size=8",
    "train.steps=4",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=5",
    "objectives.mrm.enabled=true",
    "objectives.mrm.mrc=true",
)


def _pretrain(data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pretrain", *base_args(data, run, *SETTINGS, *extra)],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def test_a_resumed_run_keeps_its_categories_when_the_data_lists_more(tmp_path: Path) -> None:
    data = build_synthetic(tmp_path / "a", samples=64)
    more = tmp_path / "b"
    shutil.copytree(data, more)  # the same samples; dataset.json gains a category
    info = json.loads((more / "dataset.json").read_text())
    categories = info["box_labels"]
    info["box_labels"] = sorted(categories + ["aardvark"])
    (more / "dataset.json").write_text(json.dumps(info))

    run = tmp_path / "run"
    first = _pretrain(data, run)
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = train_records(run)
    client = json.loads((run / "checkpoints" / "step00000002" / "client_state.json").read_text())
    assert client["categories"] == categories

    shutil.rmtree(run / "checkpoints" / "step00000004")
    (run / "checkpoints" / "latest").write_text("step00000002")
    resumed = _pretrain(more, run, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 box labels are not among the run's 32 categories" in resumed.stderr
    records = train_records(run)
    for step in (3, 4):  # same class indices for the same samples: the same losses, MRC included
        assert records[step]["loss/mrc"] == uninterrupted[step]["loss/mrc"]
        assert records[step]["loss/total"] == uninterrupted[step]["loss/total"]

    # A checkpoint without saved categories: the head no longer fits, said in one line.
    shutil.rmtree(run / "checkpoints" / "step00000004")
    (run / "checkpoints" / "latest").write_text("step00000002")
    state = run / "checkpoints" / "step00000002" / "client_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "categories"}))
    refused = _pretrain(more, run, "--resume", "auto")
    assert refused.returncode == 2
    assert "does not fit the model this configuration builds" in refused.stderr
    assert "heads.mrm.mrc.out.weight" in refused.stderr and "Traceback" not in refused.stderr
