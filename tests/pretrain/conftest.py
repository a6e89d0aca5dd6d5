"""Fixtures shared by the pretrain tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A folder that passes the dataset-folder check: a well-formed dataset.json (no shards needed here)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset.json").write_text(
        json.dumps({"builder": "test", "arguments": {}, "shards": [], "total_samples": 0})
    )
    return folder
