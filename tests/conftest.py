"""Shared test fixtures: paths, free ports, and the environment every relalign process needs on CPU."""

from __future__ import annotations

import os
import shutil
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


def require(condition: bool, reason: str) -> None:
    """Skip outside CI, fail in CI: a test that needs a program must not pass CI by skipping.

    .ci/run installs everything these tests need, so with CI=true a missing program is a broken setup.
    """
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run must provide it)", pytrace=False)
    pytest.skip(reason)


def require_programs(*names: str) -> None:
    """`require` that each program is on PATH (or in /usr/sbin, where daemons live)."""
    missing = [n for n in names if shutil.which(n) is None and not os.path.exists(f"/usr/sbin/{n}")]
    require(not missing, f"{', '.join(missing)} absent (apt: see .ci/run)")


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
