"""Box categories (json `box_labels`): written by the synthetic and COCO builders, listed in
dataset.json, carried through the crop to the batch's `box_categories`, and tokenised as Oscar's
object tags when `data.max_tag_len` > 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data_tools.collate import box_categories, tag_text
from data_tools.loader import DataConfig, Loader
from data_tools.synthetic import COLOURS, SHAPES
from tests.data_tools.conftest import build, read_samples


def test_synthetic_scenes_label_every_box_and_the_dataset_lists_the_labels(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    assert build("build", "synthetic", "--samples", "6", "--seed", "2", "--out", str(out), "--shard-samples", "4") == 0
    samples = read_samples(out)
    seen = set()
    for sample in samples.values():
        meta = sample["meta"]
        assert len(meta["box_labels"]) == len(meta["boxes"]) >= 2
        for label in meta["box_labels"]:
            colour, shape = label.split(" ")
            assert colour in COLOURS and shape in SHAPES
        seen |= set(meta["box_labels"])
    assert json.loads((out / "dataset.json").read_text())["box_labels"] == sorted(seen)  # union over both shards


def test_coco_labels_reach_dataset_json(tiny_coco: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    assert build("build", "coco", str(tiny_coco), "--split", "train2017", "--out", str(out)) == 0
    assert json.loads((out / "dataset.json").read_text())["box_labels"] == ["bus", "dog"]


def test_batches_carry_categories_and_tags(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    assert build("build", "synthetic", "--samples", "8", "--seed", "4", "--out", str(out)) == 0
    vocabulary = json.loads((out / "dataset.json").read_text())["box_labels"]
    loader = Loader(DataConfig(paths=[str(out)], batch_size=4, max_tag_len=12, crop_scale=(1.0, 1.0)))
    batch = next(iter(loader))
    for i, key in enumerate(batch["key"]):
        labels = read_samples(out)[key]["meta"]["box_labels"]
        assert [vocabulary[c] for c in batch["box_categories"][i].tolist()] == labels  # full crop: every box kept
        tags = loader.tokenizer.decode(batch["tag_ids"][i][batch["tag_mask"][i]], skip_special_tokens=True)
        assert tags == " ".join(dict.fromkeys(labels))
    masked = batch["tag_mlm_labels"] != -100
    assert torch.equal(batch["tag_mlm_labels"][masked], batch["tag_ids"][masked])
    plain = next(iter(Loader(DataConfig(paths=[str(out)], batch_size=4))))
    assert "tag_ids" not in plain and "box_categories" in plain


def test_samples_without_labels_have_no_tags_and_unknown_categories() -> None:
    boxes = np.zeros((2, 4), np.float32)
    assert tag_text(None) == "" and tag_text({"boxes": boxes, "box_labels": None}) == ""
    assert tag_text({"boxes": boxes, "box_labels": ["dog", "dog"]}) == "dog"
    assert box_categories({"boxes": boxes, "box_labels": None}, {"dog": 0}).tolist() == [-1, -1]
    assert box_categories({"boxes": boxes, "box_labels": ["cat", "dog"]}, {"dog": 0}).tolist() == [-1, 0]
    assert box_categories(None, {"dog": 0}).numel() == 0
