"""`python -m pretrain export RUN --out DIR`: consolidated safetensors + model config + tokenizer,
loadable by `pretrain.weights.load_model`, from ZeRO 0 fp32 and ZeRO 2 bf16 runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from pretrain.export import consolidated_state_dict
from pretrain.weights import load_model
from tests.pretrain.runs import PYTHON, REPO, RUN_TIMEOUT_S, base_args, build_synthetic, env_for, latest_tag


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("data") / "synthetic", samples=64)


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pretrain", *args],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "bf16")])
def test_export_round_trip(synthetic: Path, tmp_path: Path, stage: int, precision: str) -> None:
    run = tmp_path / "run"
    proc = _pretrain(
        *base_args(
            synthetic, run, "train.steps=3", f"zero.stage={stage}", f"precision={precision}", "data.batch_size=8"
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "export"
    proc = _pretrain("export", str(run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "model_config.json", "tokenizer", "export.json"}
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == 3 and info["checkpoint"].endswith(latest_tag(run))

    model, tokenizer = load_model(out)
    trained = consolidated_state_dict(run / "checkpoints" / latest_tag(run))
    state = model.state_dict()
    assert set(state) == set(trained)
    for name, value in trained.items():
        assert value.dtype == torch.float32
        assert state[name].shape == value.shape and torch.equal(state[name], value), name
    assert model.config.vocab_size == len(tokenizer)
    assert not model.training

    encoded = tokenizer(["a small red circle left of a blue square"], return_tensors="pt")
    with torch.no_grad():
        pixels = torch.zeros(1, 3, model.config.image_size, model.config.image_size)
        tokens, mask = model.embed_visual({"pixel_values": pixels})
        out_ = model(encoded["input_ids"], encoded["attention_mask"].bool(), tokens, mask)
        logits = model.itm_logits(out_)
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_export_without_checkpoint_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = _pretrain("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing" in lines[0] and "checkpoint" in lines[0], proc.stderr


class _Trap:
    """An object whose unpickling runs code (creates a file): what a hostile checkpoint could hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("zero_files", [False, True])
def test_export_never_unpickles_code_from_a_copied_run(tmp_path: Path, zero_files: bool) -> None:
    """Defect: export loaded model states with weights_only=False, so a run folder copied from
    elsewhere could run code. Both the ZeRO 0 path and DeepSpeed's ZeRO consolidation are covered."""
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "run" / "checkpoints" / "step00000001"
    checkpoint.mkdir(parents=True)
    payload = {"module": {"model.w": torch.zeros(2)}, "trap": _Trap(str(marker))}
    torch.save(payload, checkpoint / "mp_rank_00_model_states.pt")
    if zero_files:  # the ZeRO path: DeepSpeed's zero_to_fp32 reads these with weights_only=False itself
        torch.save(payload, checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (checkpoint / "client_state.json").write_text(json.dumps({"step": 1, "config": {}, "config_hash": "x"}))
    (checkpoint.parent / "latest").write_text("step00000001\n")
    proc = _pretrain("export", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert proc.returncode in (2, 3), proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to unpickle" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()
