"""Locked-image tuning (configs/lit_coco.yaml): the dual encoder trains through the real trainer on a
feature cache, the text tower's frozen part (`model.freeze_text`) does not move, and the learned
temperature (`objectives.itc.learn_temperature`) does; a fixed temperature stays put."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from data_tools.errors import ConfigError
from tests.pretrain.runs import PYTHON, REPO, RUN_TIMEOUT_S, env_for, latest_tag, model_state

pytest.importorskip("efficientnet_lite_pytorch")
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

PRESET = str(REPO / "configs" / "lit_coco.yaml")


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> Path:
    """Synthetic scenes (with their tokenizer) and their pooled EfficientNet-Lite0 feature cache."""
    root = tmp_path_factory.mktemp("lit")
    for argv in (
        ["build", "synthetic", "--samples", "24", "--out", str(root / "scenes")],
        [
            "features",
            str(root / "scenes"),
            "--backbone",
            "efficientnet-lite0",
            "--pooled",
            "--image-size",
            "64",
            "--out",
            str(root / "pooled"),
        ],
    ):
        subprocess.run(
            [PYTHON, "-m", "data_tools", *argv],
            cwd=REPO,
            env=env_for(),
            check=True,
            capture_output=True,
            timeout=RUN_TIMEOUT_S,
        )
    return root / "pooled"


def train(data: Path, run_dir: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """The LiT preset at tiny size on `data`: 3 steps; the weights of step 0 (before any update) and 3."""
    args = [
        "--config",
        PRESET,
        f"data.paths=[{data}]",
        "data.tokenizer=null",
        "data.batch_size=8",
        f"run.dir={run_dir}",
        "metrics.enabled=false",
        "model.preset=tiny_dual_encoder",
        "model.init_from=null",
        "train.steps=3",
        "schedule.warmup_steps=0",
        "optimizer.lr=1e-2",
        "train.log_every=1",
        *overrides,
    ]
    proc = subprocess.run(
        [PYTHON, "-m", "pretrain", *args],
        cwd=REPO,
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return model_state(run_dir / "checkpoints" / latest_tag(run_dir))


def initial(data: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """The weights a fresh run starts from (the trainer seeds the model the same way)."""
    from pretrain.config import load_config
    from pretrain.model import build_model
    from data_tools.loader import tokenizer_folder
    from transformers import AutoTokenizer
    import dataclasses

    cfg = load_config(
        PRESET,
        [
            f"data.paths=[{data}]",
            "data.tokenizer=null",
            "model.preset=tiny_dual_encoder",
            "model.init_from=null",
            *overrides,
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(cfg.data)))
    torch.manual_seed(cfg.train.seed)
    model = build_model(dataclasses.replace(cfg.model, vocab_size=len(tokenizer)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_text_layers_stay_and_the_temperature_learns(pooled: Path, tmp_path: Path) -> None:
    after = train(pooled, tmp_path / "run", "model.freeze_text=1")
    # Frozen: the text embeddings and the lowest encoder layer; trained: the layer above, the image
    # tower, the projections and the temperature.
    from pretrain.model import ModelConfig, build_model

    shape = ModelConfig.preset(
        "tiny_dual_encoder",
        vocab_size=after["embeddings.word_embeddings.weight"].shape[0],
        visual_embedder="features",
        feature_dim=1280,
        max_visual_tokens=64,
        freeze_text=1,
    )
    model = build_model(shape)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("embeddings.", "encoder.layer.0.")) for n in frozen)
    assert any(n.startswith("encoder.layer.1.") for n, p in model.named_parameters() if p.requires_grad)
    start = initial(pooled, "model.freeze_text=1")
    for name in frozen:
        assert torch.equal(after[name], start[name]), f"{name} moved although frozen"
    for name in ("encoder.layer.1.output.dense.weight", "visual.feature_proj.weight", "itc.text_proj.weight"):
        if name in after:
            assert not torch.equal(after[name], start[name]), f"{name} did not train"
    assert after["logit_scale"].item() != pytest.approx(start["logit_scale"].item(), abs=1e-6)


def test_a_fixed_temperature_stays_and_freeze_text_is_validated(pooled: Path, tmp_path: Path) -> None:
    after = train(pooled, tmp_path / "run", "objectives.itc.learn_temperature=false", "model.freeze_text=all")
    start = initial(pooled)
    assert torch.equal(after["logit_scale"], start["logit_scale"])
    assert all(torch.equal(after[n], start[n]) for n in after if n.startswith(("embeddings.", "encoder.")))
    for bad in (3, "some", True):  # tiny_dual_encoder has 2 layers
        with pytest.raises(ConfigError, match="model.freeze_text"):
            from pretrain.model import ModelConfig

            ModelConfig.preset("tiny_dual_encoder", freeze_text=bad)
