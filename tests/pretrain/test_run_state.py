"""The saved run state (pretrain.run_state): one typed, versioned record; every earlier shape of
`client_state.json` still reads, and a checkpoint written before the record existed still resumes.

fixtures/run_state/ holds the client state of each earlier shape: `unversioned_categories.json` was
written by a 2-step tiny run of the code just before the record (configs/tiny.yaml, 256 synthetic
samples, seed 0, data.batch_size=4); the two older shapes are that file with the keys of their
commits (see the formats in pretrain/run_state.py); `format1.json` is the first as format 1 wrote it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from data_tools.errors import UserError
from pretrain.run_state import CLIENT_STATE, FORMAT_VERSION, RunState, TrainState, read_run_state, write_run_state
from tests.pretrain.runs import PYTHON, REPO, RUN_TIMEOUT_S, build_synthetic, env_for, latest_tag

FIXTURES = Path(__file__).parent / "fixtures" / "run_state"
LEGACY = sorted(FIXTURES.glob("unversioned_*.json")) + [FIXTURES / "format1.json"]


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_every_earlier_shape_reads(path: Path) -> None:
    raw = json.loads(path.read_text())
    state = RunState.from_json(path.read_text(), str(path))
    assert state.progress == TrainState(step=2, epoch=0, cursor=raw["cursor"], samples=8, nonfinite_total=0)
    assert state.progress.objective == {}  # before format 2: no objective state (fixed-step phases)
    assert (state.total_steps, state.global_batch, state.world_size, state.tag) == (2, 4, 1, "step00000002")
    assert state.task == "pretrain" and state.config == raw["config"] and state.config_hash == raw["config_hash"]
    assert state.categories == raw.get("categories")
    assert state.model_config(vocab_size=50).architecture == "single_stream"


def test_round_trip_writes_the_current_format(tmp_path: Path) -> None:
    state = RunState.from_json((FIXTURES / "unversioned_categories.json").read_text())
    write_run_state(tmp_path, state)
    tree = json.loads((tmp_path / CLIENT_STATE).read_text())
    assert tree["format"] == FORMAT_VERSION and tree["step"] == 2 and "progress" not in tree
    assert read_run_state(tmp_path) == state


def test_a_newer_or_broken_format_is_one_line(tmp_path: Path) -> None:
    tree = json.loads((FIXTURES / "unversioned_categories.json").read_text())
    with pytest.raises(UserError, match="format 99 is not one this code reads"):
        RunState.from_json(json.dumps({**tree, "format": 99}))
    with pytest.raises(UserError, match="not a run state"):
        RunState.from_json(json.dumps({"format": FORMAT_VERSION, "step": 1}))
    with pytest.raises(UserError, match="cannot be read"):
        read_run_state(tmp_path / "missing")


@pytest.mark.slow
def test_a_checkpoint_written_before_the_record_resumes(tmp_path: Path) -> None:
    """DeepSpeed state from a fresh 2-step run, client state from the code before the record (with
    the run lengthened to 4 steps): the resume continues at step 2 and saves format 1."""
    legacy = json.loads((FIXTURES / "unversioned_categories.json").read_text())
    data, run = build_synthetic(tmp_path / "synthetic"), tmp_path / "run"
    config = dict(
        legacy["config"], data={**legacy["config"]["data"], "paths": [str(data)]}, run={"dir": str(run), "name": "run"}
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    def pretrain(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "pretrain", "--config", str(tmp_path / "config.yaml"), *args],
            cwd=REPO,
            env=env_for(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )

    first = pretrain()
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = run / "checkpoints" / latest_tag(run)
    (checkpoint / CLIENT_STATE).write_text(json.dumps(dict(legacy, total_steps=4), indent=1))
    resumed = pretrain("--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    assert latest_tag(run) == "step00000004"
    saved = json.loads((run / "checkpoints" / "step00000004" / CLIENT_STATE).read_text())
    assert saved["format"] == FORMAT_VERSION and saved["samples"] == 16 and saved["total_steps"] == 4
    assert saved["categories"] == legacy["categories"] and saved["cursor"]["streams"][0]["position"] == 16
