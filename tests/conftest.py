"""Shared test fixtures: paths, free ports, and the environment every relalign process needs on CPU."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_MINI = SHARED / "data" / "coco_mini"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def coco_mini() -> Path:
    """The real COCO subset beside the checkout; skipped where it is absent (a user's clone)."""
    if not (COCO_MINI / "annotations").is_dir():
        pytest.skip(f"{COCO_MINI} is absent")
    return COCO_MINI


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (each multi-process test takes its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
