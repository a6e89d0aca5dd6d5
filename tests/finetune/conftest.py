"""Fixtures for the evaluation tests: a tiny synthetic dataset and a randomly initialised tiny model
exported as `python -m pretrain export` writes it (safetensors, model_config.json, tokenizer/)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.data_tools.conftest import build


def build_synthetic(out: Path, samples: int, seed: int = 0) -> Path:
    assert build("build", "synthetic", "--samples", str(samples), "--seed", str(seed), "--out", str(out)) == 0
    return out


def export_model(model, tokenizer_dir: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    from pretrain.export import MODEL_CONFIG, TOKENIZER, WEIGHTS

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    (out / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(model.config)))
    shutil.copytree(tokenizer_dir, out / TOKENIZER)
    return out


def tiny_model(vocab_size: int, seed: int = 0):
    from pretrain.model import ModelConfig, RelAlignModel

    torch.manual_seed(seed)
    return RelAlignModel(ModelConfig.preset("tiny", vocab_size=vocab_size)).eval()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """16 synthetic scenes (about 40 captions), seed 0."""
    return build_synthetic(tmp_path_factory.mktemp("eval") / "synthetic", 16)


@pytest.fixture(scope="session")
def tokenizer(synthetic):
    from data_tools.collate import load_tokenizer

    return load_tokenizer(synthetic / "tokenizer")


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="session")
def exported(tmp_path_factory, model, synthetic) -> Path:
    return export_model(model, synthetic / "tokenizer", tmp_path_factory.mktemp("export") / "tiny")


@pytest.fixture(scope="session")
def eval_set(synthetic):
    from finetune.eval_data import read_eval_set

    return read_eval_set(synthetic, image_size=64)
