"""`tf32`: float32 matrix products and convolutions on CUDA use TensorFloat-32 unless the config says
false, applied once when the engine is built; nothing changes on CPU."""

from __future__ import annotations

import types

import pytest
import torch

from pretrain.engine import (
    EngineSpec,
    OptimizerConfig,
    ScheduleConfig,
    ZeroConfig,
    batch_geometry,
    build_engine,
    set_tf32,
)


@pytest.fixture
def tf32_flags():
    """The process-wide flags, restored after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_set_tf32_switches_cublas_and_cudnn_on_cuda_only(tf32_flags):
    assert set_tf32(True, "cuda") and tf32_flags() == (True, True)
    assert not set_tf32(False, "cuda") and tf32_flags() == (False, False)
    assert torch.get_float32_matmul_precision() == "highest"  # readable through the older API too
    assert not set_tf32(True, "cpu") and tf32_flags() == (False, False)  # CPU: untouched


@pytest.mark.parametrize("tf32", [True, False])
def test_build_engine_applies_the_config_on_a_cuda_engine(tf32, tf32_flags, monkeypatch):
    import deepspeed

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    engine = types.SimpleNamespace(device=torch.device("cuda", 0))  # what deepspeed.initialize returns on a GPU
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: (engine, kw["optimizer"], None, kw["lr_scheduler"]))
    spec = EngineSpec(OptimizerConfig(), ScheduleConfig(), ZeroConfig(), "fp32", 1.0, tf32)
    built, _ = build_engine(torch.nn.Linear(4, 4), object(), spec, batch_geometry(2, 1, 1), total_steps=10)
    assert built is engine and tf32_flags() == (tf32, tf32)


def test_build_engine_on_cpu_leaves_the_flags(tf32_flags, monkeypatch):
    import deepspeed

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    engine = types.SimpleNamespace(device=torch.device("cpu"))
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: (engine, kw["optimizer"], None, kw["lr_scheduler"]))
    build_engine(
        torch.nn.Linear(4, 4),
        object(),
        EngineSpec(OptimizerConfig(), ScheduleConfig(), ZeroConfig()),
        batch_geometry(2, 1, 1),
        total_steps=10,
    )
    assert tf32_flags() == (False, False)


def test_config_field_defaults_on_and_reads_false(tmp_path):
    from pretrain.checkpoint import RESUME_MUTABLE
    from pretrain.config import config_from_dict

    tree = {"data": {"paths": [str(tmp_path)]}, "model": {"preset": "tiny"}}
    assert config_from_dict(tree).tf32 is True
    assert config_from_dict({**tree, "tf32": False}).tf32 is False
    assert "tf32" in RESUME_MUTABLE  # a kernel choice: a run may resume on other hardware
