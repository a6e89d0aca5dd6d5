"""The repository passes `ruff check` and `ruff format --check` (configuration: pyproject.toml [tool.ruff]),
with the ruff pinned in the dev extra, run from the same virtual environment as the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff() -> Path:
    path = Path(sys.executable).parent / "ruff"
    if not path.exists():
        pytest.fail(f"ruff is not installed next to {sys.executable}: run scripts/setup_env.sh (the dev extra pins it)")
    return path


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    proc = subprocess.run(
        [str(ruff()), *command, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"ruff {' '.join(command)} failed:\n{proc.stdout}{proc.stderr}"
