"""COCO builder: captions grouped per image, boxes from instances (scaled with --resize), duplicates
merged, bad files rejected and listed; and the real coco_mini subset where it is present."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from data_tools.images import content_hash
from data_tools.manifest import load_dataset
from tests.data_tools.conftest import build, read_samples


def test_coco_tiny(tiny_coco, tmp_path):
    out = tmp_path / "out"
    assert build("build", "coco", str(tiny_coco), "--split", "train2017", "--out", str(out)) == 0
    info, table = load_dataset(out)
    samples = read_samples(out)
    assert sorted(samples) == ["000000000001", "000000000002", "000000000003"]
    # image 4 has image 1's bytes: one sample, captions merged in listing order
    assert samples["000000000001"]["meta"]["captions"] == [
        "a dog on a sofa",
        "a brown dog resting",
        "a dog lying on a couch",
    ]
    assert samples["000000000002"]["meta"]["captions"] == ["two cats"]  # the blank caption is dropped
    assert samples["000000000001"]["meta"]["boxes"] == [[4.0, 6.0, 20.0, 10.0]]
    assert samples["000000000001"]["meta"]["box_labels"] == ["dog"]
    assert "boxes" not in samples["000000000002"]["meta"]
    for key, s in samples.items():
        original = (tiny_coco / "images" / "train2017" / f"{key}.jpg").read_bytes()
        assert s["image"] == original and s["ext"] == "jpg"  # no --resize: original bytes kept
        assert s["row"]["content_hash"] == content_hash(original) and s["row"]["split"] == "train2017"
        assert s["meta"]["image_id"] == str(int(key)) and s["meta"]["source"] == "coco"
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {(r["key"], r["reason"]) for r in rejected} == {
        ("000000000005", "missing_image"),
        ("000000000006", "decode_error"),
    }
    assert all(r["source"].endswith(".jpg") for r in rejected)
    assert info.rejected == {"decode_error": 1, "missing_image": 1}
    assert info.total_samples == 3 == table.num_rows


def test_coco_resize_scales_boxes(tiny_coco, tmp_path):
    out = tmp_path / "out"
    assert build("build", "coco", str(tiny_coco), "--out", str(out), "--resize", "40", "--quality", "80") == 0
    samples = read_samples(out)
    s = samples["000000000003"]  # 88 x 48 -> 40 x 22
    image = Image.open(io.BytesIO(s["image"]))
    assert image.size == (40, 22) == (s["meta"]["width"], s["meta"]["height"]) and image.format == "JPEG"
    assert s["meta"]["boxes"] == [[0.0, 0.0, round(30.5 * 40 / 88, 2), round(12.0 * 22 / 48, 2)]]
    assert s["row"]["width"] == 40 and s["row"]["image_bytes"] == len(s["image"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "val2017"], "--images"),
        (["--captions", "{root}/annotations/nothing.json"], "--captions"),
        (["--instances", "{root}/bad.json"], "unreadable annotation file"),
    ],
)
def test_coco_bad_arguments(tiny_coco, tmp_path, capsys, extra, message):
    (tiny_coco / "bad.json").write_text("{not json")
    extra = [e.format(root=tiny_coco) for e in extra]
    assert build("build", "coco", str(tiny_coco), *extra, "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_coco_mini_real(coco_mini, tmp_path):
    out = tmp_path / "val"
    assert (
        build(
            "build",
            "coco",
            str(coco_mini),
            "--split",
            "val2017",
            "--out",
            str(out),
            "--resize",
            "256",
            "--shard-samples",
            "64",
            "--workers",
            "2",
        )
        == 0
    )
    info, table = load_dataset(out)
    captions = json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text())
    hashes = {content_hash(p.read_bytes()) for p in (coco_mini / "images" / "val2017").glob("*.jpg")}
    assert info.total_samples == len(hashes) == 159 and [s.samples for s in info.shards] == [64, 64, 31]
    assert sum(table.column("num_captions").to_pylist()) == len(captions["annotations"])
    assert max(max(w, h) for w, h in zip(table.column("width").to_pylist(), table.column("height").to_pylist())) == 256
    samples = read_samples(out)
    with_boxes = [s for s in samples.values() if "boxes" in s["meta"]]
    assert len(with_boxes) == 79
    for s in with_boxes:
        w, h = s["meta"]["width"], s["meta"]["height"]
        assert all(0 <= x and 0 <= y and x + bw <= w + 0.5 and y + bh <= h + 0.5 for x, y, bw, bh in s["meta"]["boxes"])


def test_shard_bytes_cut_by_input_bytes(tiny_coco, tmp_path):
    sizes = sorted(
        p.stat().st_size for p in (tiny_coco / "images" / "train2017").glob("*.jpg") if p.stat().st_size > 100
    )
    limit = sizes[0] + sizes[1]  # room for the two smallest images together, not for two larger ones
    out = tmp_path / "o"
    assert build("build", "coco", str(tiny_coco), "--shard-bytes", str(limit), "--out", str(out)) == 0
    info, table = load_dataset(out)
    inputs = {
        k: (tiny_coco / "images" / "train2017" / f"{k}.jpg").stat().st_size for k in table.column("key").to_pylist()
    }
    per_shard: dict[int, int] = {}
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist()):
        per_shard[shard] = per_shard.get(shard, 0) + inputs[key]
    assert len(info.shards) >= 2 and all(v <= limit for v in per_shard.values())
    assert build("build", "coco", str(tiny_coco), "--shard-bytes", "1K", "--out", str(tmp_path / "k")) == 0
    assert [s.samples for s in load_dataset(tmp_path / "k")[0].shards] == [
        1,
        1,
        1,
    ]  # every image > 1 KiB: one per shard
