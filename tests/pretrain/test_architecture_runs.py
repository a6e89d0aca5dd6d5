"""Every architecture through the real trainer, with real processes:

- two_stream and dual_encoder train 2 steps on 2 ranks under ZeRO 2, and a run resumed from the step-1
  checkpoint ends with the same losses and weights, bit for bit (single_stream: tests/pretrain/test_resume.py);
- ZeRO 3 in bf16 trains and exports;
- the export evaluates with `python -m finetune evaluate` (ITM `full` for two_stream, `embedding` for the
  dual encoder, which refuses ITM modes in one line, exit 2).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.pretrain.runs import (
    PYTHON,
    REPO,
    RUN_TIMEOUT_S,
    assert_same_weights,
    base_args,
    build_synthetic,
    env_for,
    latest_tag,
    logs_text,
    model_state,
    run_ranks,
    train_records,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ARCHITECTURES = {
    "two_stream": ("model.preset=tiny_two_stream",),
    "dual_encoder": (
        "model.preset=tiny_dual_encoder",
        "iais.enabled=false",
        "objectives.itm=false",
        "objectives.mlm=false",
    ),
}
LOSSES = {"two_stream": ("loss/itc", "loss/itm", "loss/mlm", "loss/iais"), "dual_encoder": ("loss/itc",)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic", samples=48)


def _run(*args: str, module: str = "pretrain") -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", module, *args], cwd=REPO, env=env_for(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_two_ranks_zero2_resume_bitwise_then_export_and_evaluate(
    synthetic: Path, tmp_path: Path, architecture: str
) -> None:
    settings = (
        *ARCHITECTURES[architecture],
        "zero.stage=2",
        "data.batch_size=4",
        "train.steps=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=5",
        "schedule.warmup_steps=1",
    )
    reference = tmp_path / "reference"
    logs = tmp_path / "logs"
    codes = run_ranks(2, base_args(synthetic, reference, *settings), free_port(), logs / "reference")
    assert codes == [0, 0], logs_text(logs / "reference")
    resumed = tmp_path / "resumed"
    first = reference / "checkpoints" / "step00000001"
    codes = run_ranks(2, base_args(synthetic, resumed, *settings, f"resume={first}"), free_port(), logs / "resumed")
    assert codes == [0, 0], logs_text(logs / "resumed")

    assert latest_tag(reference) == latest_tag(resumed) == "step00000002"
    assert_same_weights(
        model_state(reference / "checkpoints" / "step00000002"), model_state(resumed / "checkpoints" / "step00000002")
    )
    ours, theirs = train_records(resumed), train_records(reference)
    for key in (*LOSSES[architecture], "loss/total", "grad_norm"):
        assert ours[2][key] == theirs[2][key], key
    assert theirs[1]["loss/total"] > 0

    exported = tmp_path / "export"
    proc = _run("export", str(reference), "--out", str(exported))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((exported / "model_config.json").read_text())["architecture"] == architecture
    mode = "embedding" if architecture == "dual_encoder" else "full"
    out = tmp_path / "eval"
    proc = _run(
        "evaluate",
        str(exported),
        "--data",
        str(synthetic),
        "--mode",
        mode,
        "--out",
        str(out),
        "--plots",
        "1",
        "--no-progress",
        module="finetune",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == mode and 0.0 <= report["recall"]["i2t@1"] <= 1.0
    assert report["relation"]["dataset"]["embedding"]["all"]["count"] > 0
    if architecture == "dual_encoder":
        assert report["cost"]["pair_forwards"] == 0 and report["isd"]["L"] is None and report["plots"] == []
        assert report["relation"]["dataset"]["itm"] == {}
        refused = _run(
            "evaluate",
            str(exported),
            "--data",
            str(synthetic),
            "--mode",
            "full",
            "--out",
            str(tmp_path / "refused"),
            module="finetune",
        )
        assert refused.returncode == 2 and "use --mode embedding" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    else:
        assert report["cost"]["pair_forwards"] == report["images"] * report["captions"]
        assert report["isd"]["L"] >= 0 and set(report["isd"]["layers"]) == {"0"} and len(report["plots"]) == 1


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_zero3_bf16_trains_and_exports(synthetic: Path, tmp_path: Path, architecture: str) -> None:
    run = tmp_path / "run"
    proc = _run(
        *base_args(
            synthetic,
            run,
            *ARCHITECTURES[architecture],
            "zero.stage=3",
            "precision=bf16",
            "data.batch_size=4",
            "train.steps=2",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = train_records(run)
    assert all(records[step]["nonfinite_steps"] == 0 for step in records)
    proc = _run("export", str(run), "--out", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    from pretrain.weights import load_model

    model, _ = load_model(tmp_path / "export")
    assert model.config.architecture == architecture
