"""`python -m finetune evaluate` end to end on CPU (synthetic scenes, an exported tiny model) and its
bad-input errors: one line, exit 2 or 3, no report folder left behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from data_tools.errors import run_cli
from finetune import recall, scoring
from finetune.__main__ import main
from finetune.evaluate import evaluate_model
from tests.data_tools.conftest import build, image_bytes, img2dataset_tar
from tests.finetune.test_relation import sugarcrepe  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_end_to_end(exported, synthetic, eval_set, model, tokenizer, tmp_path, sugarcrepe):  # noqa: F811
    out = tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune",
            "evaluate",
            str(exported),
            "--data",
            str(synthetic),
            "--mode",
            "full",
            "--out",
            str(out),
            "--plots",
            "2",
            "--layers",
            "0",
            "-1",
            "--pairs",
            str(sugarcrepe / "replace_rel.json"),
            str(sugarcrepe / "swap_att.json"),
            "--images",
            str(sugarcrepe / "images"),
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "| text retrieval" in md and "| replace_rel |" in md and "ISDa" in md
    assert len(report["plots"]) == 2
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images, captions = len(eval_set.images), len(eval_set.captions)
    assert (report["images"], report["captions"]) == (images, captions)
    assert report["cost"]["pair_forwards"] == images * captions
    assert report["cost"]["relation_pair_forwards"] == 2 * captions + 10
    assert report["cost"]["wall_seconds"] > 0
    # The recalls are the recall of the full ITM matrix computed here from the same weights.
    full = scoring.score_gallery(
        model, eval_set, tokenizer, mode="full", max_text_len=64, visual="pixels", image_size=64
    )
    assert report["recall"] == pytest.approx(recall.recall(full.scores_i2t, eval_set.caption_image))
    assert set(report["relation"]) == {"dataset", "pairs"}
    assert report["relation"]["pairs"]["itm"]["replace_rel"]["count"] == 3
    assert set(report["isd"]["layers"]) == {"0", "1"}
    assert report["isd"]["isda"] is not None and report["isd"]["L"] >= 0


def test_evaluate_model_returns_flat_metrics(model, tokenizer, eval_set, tmp_path):
    metrics = evaluate_model(model, tokenizer, eval_set, mode="rerank", k=4, layers=[-1], out_dir=tmp_path / "r")
    for key in (
        "recall/i2t@1",
        "recall/i2t@5",
        "recall/i2t@10",
        "recall/t2i@1",
        "recall/t2i@5",
        "recall/t2i@10",
        "recall/mean",
        "relation/relation",
        "relation/attribute",
        "relation/all",
        "isd/L",
        "isd/V",
        "isda",
    ):
        assert key in metrics, key
        assert math.isfinite(metrics[key]), key  # NaN fails every comparison below, so say it first
        if key.startswith("isd"):
            assert metrics[key] >= 0.0, key  # symmetric KL divergences
        else:
            assert 0.0 <= metrics[key] <= 1.0, key
    six = [metrics[f"recall/{d}@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert metrics["recall/mean"] == pytest.approx(sum(six) / 6)
    assert (tmp_path / "r" / "report.json").is_file()
    assert model.training is False
    # synthetic scenes: recall also counts another scene's caption that is true of the image (never lower)
    for key in ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "mean"):
        assert metrics[f"recall/{key}"] <= metrics[f"recall_any_true/{key}"] <= 1.0, key
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert (metrics["isd/L"], metrics["isd/V"], metrics["isda"]) == (
        report["isd"]["L"],
        report["isd"]["V"],
        report["isd"]["isda"],
    )
    assert report["recall_any_true"]["true_captions_per_image"] >= report["recall_any_true"]["own_captions_per_image"]
    assert "Counting any caption true of the image" in (tmp_path / "r" / "report.md").read_text()


def _fails(argv, capsys, code, needle):
    assert run_cli(main, argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    return err


def test_k_must_be_positive(exported, synthetic, tmp_path, capsys):
    for k in ("0", "-3"):
        _fails(
            [
                "evaluate",
                str(exported),
                "--data",
                str(synthetic),
                "--mode",
                "rerank",
                "--k",
                k,
                "--out",
                str(tmp_path / "o"),
            ],
            capsys,
            2,
            "--k",
        )
    assert not (tmp_path / "o").exists()


def test_weights_that_do_not_match_the_config(exported, synthetic, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    config = json.loads((bad / "model_config.json").read_text())
    config["mlp_ratio"] = 2.0
    (bad / "model_config.json").write_text(json.dumps(config))
    _fails(
        ["evaluate", str(bad), "--data", str(synthetic), "--out", str(tmp_path / "o")],
        capsys,
        2,
        "do not match the model config",
    )
    assert not (tmp_path / "o").exists()


def test_dataset_without_captions(exported, tmp_path, capsys):
    raw = tmp_path / "i2d"
    img2dataset_tar(raw / "00000.tar", [(f"{i:09d}", image_bytes(i), "   ", {"key": f"{i:09d}"}) for i in range(3)])
    assert build("build", "img2dataset", str(raw), "--out", str(tmp_path / "nocap")) == 0
    capsys.readouterr()  # the builder's own lines
    _fails(
        ["evaluate", str(exported), "--data", str(tmp_path / "nocap"), "--out", str(tmp_path / "o")],
        capsys,
        3,
        "no sample with a caption",
    )
    assert not (tmp_path / "o").exists()


def test_pairs_naming_a_missing_image(exported, synthetic, sugarcrepe, tmp_path, capsys):  # noqa: F811
    (sugarcrepe / "images" / "c.png").unlink()
    _fails(
        [
            "evaluate",
            str(exported),
            "--data",
            str(synthetic),
            "--out",
            str(tmp_path / "o"),
            "--pairs",
            str(sugarcrepe / "swap_att.json"),
            "--images",
            str(sugarcrepe / "images"),
        ],
        capsys,
        3,
        "c.png",
    )
    assert not (tmp_path / "o").exists()


def test_finetune_without_a_config_is_one_line(capsys):
    _fails([], capsys, 2, "--config")
