"""A real run with Oscar tags, MRM (with MRC) and WRA: 4 steps, then the same run resumed from its
step-2 checkpoint ends bitwise equal (model and objective heads), logs each loss, and the export
holds the model only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.pretrain.runs import PYTHON, REPO, RUN_TIMEOUT_S, base_args, build_synthetic, env_for, train_records

OBJECTIVES = [
    "data.batch_size=4",
    "train.steps=4",
    "checkpoint.every_steps=2",
    "data.max_tag_len=12",
    "model.max_text_len=64",
    "objectives.tags.enabled=true",
    "objectives.mrm.enabled=true",
    "objectives.mrm.mrc=true",
    "objectives.wra.enabled=true",
]


def _train(data: Path, run: Path, *extra: str) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "pretrain", *base_args(data, run, *OBJECTIVES, *extra)],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _module_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every trained tensor of a ZeRO 0 fp32 checkpoint, the objective's heads included."""
    return torch.load(next(checkpoint.glob("mp_rank_*_model_states.pt")), map_location="cpu", weights_only=True)[
        "module"
    ]


@pytest.mark.slow
def test_tags_mrm_wra_train_and_resume_bitwise(tmp_path: Path) -> None:
    data = build_synthetic(tmp_path / "data", samples=16)
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    _train(data, first)
    _train(data, resumed, "--resume", str(first / "checkpoints" / "step00000002"))
    a = _module_state(first / "checkpoints" / "step00000004")
    b = _module_state(resumed / "checkpoints" / "step00000004")
    assert any(k.startswith("heads.mrm.mrc.") for k in a) and any(k.startswith("heads.tags.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records, again = train_records(first), train_records(resumed)
    for name in ("loss/tags", "loss/mrm", "loss/mrfr", "loss/mrc", "loss/wra", "loss/mlm", "loss/iais"):
        assert [records[s][name] for s in (3, 4)] == [again[s][name] for s in (3, 4)], name
    from pretrain.export import consolidated_state_dict

    exported = consolidated_state_dict(first / "checkpoints" / "step00000004")
    assert exported and not any(k.startswith("heads.") for k in exported)
    assert all(torch.equal(exported[k], a["model." + k].float()) for k in exported)
