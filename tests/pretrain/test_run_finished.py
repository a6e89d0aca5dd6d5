"""`pretrain.run_config.run_finished`: what the benches and scripts/coco_path.py use to skip a finished
stage. A run stopped midway has a `latest` checkpoint too; taking it as finished once fed a 1-step
finetuning run to an evaluation."""

from __future__ import annotations

from pretrain.run_config import run_finished


def make_run(tmp_path, steps: int, latest: str | None):
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(f"train:\n  steps: {steps}\n  seed: 0\n")
    if latest is not None:
        (tmp_path / "checkpoints" / "latest").write_text(latest + "\n")
    return tmp_path


def test_a_run_is_finished_when_its_latest_checkpoint_is_its_last_step(tmp_path):
    assert run_finished(make_run(tmp_path / "done", 40, "step00000040"))
    assert not run_finished(make_run(tmp_path / "midway", 40, "step00000001"))
    assert not run_finished(make_run(tmp_path / "fresh", 40, None))
    assert not run_finished(tmp_path / "missing")


def test_a_length_derived_from_epochs_takes_any_latest_checkpoint(tmp_path):
    assert run_finished(make_run(tmp_path / "epochs", 0, "step00000007"))
