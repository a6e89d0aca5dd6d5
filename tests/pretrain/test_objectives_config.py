"""What the optional objectives ask of the configuration and the data is checked before any process
group starts: one line naming the field, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.errors import ExitCode, run_cli
from pretrain.__main__ import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def _dataset(tmp_path: Path, box_labels) -> Path:
    """A folder that passes the dataset-folder check (no shards needed before a process starts)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    info = {"builder": "test", "arguments": {}, "shards": [], "total_samples": 0, "box_labels": box_labels}
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize(
    "overrides,field,words",
    [
        (["objectives.mrm.enabled=true", "objectives.mrm.mrc=true"], "objectives.mrm.mrc", "carries box categories"),
        (
            ["objectives.tags.enabled=true", "data.max_tag_len=8", "model.max_text_len=64"],
            "objectives.tags.enabled",
            "carries box categories",
        ),
        (["objectives.tags.enabled=true"], "data.max_tag_len", "an integer > 0"),
        (["objectives.tags.enabled=true", "data.max_tag_len=40"], "data.max_tag_len", "at most model.max_text_len"),
        (["objectives.sampling=sometimes"], "objectives.sampling", "'joint' | 'per_batch'"),
        (
            [
                "objectives.sampling=per_batch",
                "objectives.itc.weight=0",
                "objectives.itm.weight=0",
                "objectives.mlm=false",
            ],
            "objectives.sampling",
            "weight > 0 to draw",
        ),
        (["objectives.wra.enabled=true", "objectives.wra.iterations=0"], "objectives.wra.iterations", ">= 1"),
        (
            ["objectives.mrm.enabled=true", "objectives.mrm.mask_probability=1"],
            "objectives.mrm.mask_probability",
            "(0, 1)",
        ),
        (
            ["objectives.position.enabled=true", "model.visual_position_std=1.0"],
            "objectives.position.enabled",
            "carries box categories",
        ),
        (["objectives.position.enabled=true"], "model.visual_position_std", "at least 1.0 with objectives.position"),
        (
            ["objectives.position.enabled=true", "data.visual=features"],
            "data.visual",
            "pixels with objectives.position",
        ),
        (
            ["objectives.position.enabled=true", "objectives.position.hold_steps=-1"],
            "objectives.position.hold_steps",
            "an integer >= 0",
        ),
    ],
)
def test_objective_mistakes_are_one_line_and_exit_2(capsys, tmp_path: Path, overrides, field: str, words: str) -> None:
    data = _dataset(tmp_path, None)  # a dataset without box categories
    code = run_cli(main, ["--config", str(TINY), f"data.paths=[{data}]", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.USAGE == 2
    assert len(err.splitlines()) == 1, err
    assert f"config: {field}=" in err and words in err, err


def test_mrc_and_tags_pass_the_check_with_categories(tmp_path: Path) -> None:
    from pretrain.config import load_config

    data = _dataset(tmp_path, ["red circle", "blue square"])
    cfg = load_config(
        str(TINY),
        [
            f"data.paths=[{data}]",
            "objectives.mrm.enabled=true",
            "objectives.mrm.mrc=true",
            "objectives.tags.enabled=true",
            "data.max_tag_len=8",
            "model.max_text_len=64",
            "objectives.sampling=per_batch",
        ],
    )
    assert cfg.objectives.terms["mrm"].mrc and cfg.objectives.sampling == "per_batch"
