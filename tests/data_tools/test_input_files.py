"""Builders read only what they were given: regular files (a FIFO named x.jpg does not hang a build,
a link to a device is not read), never more than the byte limit, and no file that annotation data
names outside the images folder (`../`, absolute paths): those are rejected with a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_tools.errors import BadSample
from data_tools.manifest import load_dataset
from data_tools.records import read_input_file
from tests.conftest import REPO
from tests.data_tools.conftest import build, image_bytes, write


def rejected(out) -> dict[str, tuple[str, str]]:
    return {
        r["key"]: (r["reason"], r["detail"]) for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())
    }


def test_fifo_named_like_an_image_or_caption_is_rejected_not_waited_on(tmp_path):
    root = tmp_path / "folder"
    write(root / "a.jpg", image_bytes(1))
    write(root / "a.txt", "a good pair")
    os.mkfifo(root / "b.jpg")  # opening it for reading would block until a writer comes
    write(root / "b.txt", "an image that is a pipe")
    write(root / "c.jpg", image_bytes(3))
    os.mkfifo(root / "c.txt")
    out = tmp_path / "out"
    # a subprocess with a timeout: opening a FIFO without O_NONBLOCK would block forever
    result = subprocess.run(
        [sys.executable, "-m", "data_tools", "build", "folder", str(root), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_dataset(out)[0].total_samples == 1
    reasons = {detail.split(":")[0]: reason for reason, detail in rejected(out).values()}
    assert reasons == {str(root / "b.jpg"): "missing_image", str(root / "c.txt"): "empty_caption"}


def test_link_to_a_device_is_not_read(tmp_path):
    root = tmp_path / "folder"
    write(root / "a.jpg", image_bytes(1))
    write(root / "a.txt", "a good pair")
    os.symlink("/dev/zero", root / "z.jpg")
    write(root / "z.txt", "endless zeros")
    assert build("build", "folder", str(root), "--out", str(tmp_path / "out")) == 0
    assert sorted(rejected(tmp_path / "out").values()) == [("missing_image", f"{root / 'z.jpg'}: not a regular file")]
    with pytest.raises(BadSample, match="not a regular file"):
        read_input_file(root / "z.jpg", 1 << 20, "missing_image")


def test_reading_stops_at_the_byte_limit(tmp_path):
    path = write(tmp_path / "big.jpg", b"x" * 1000)
    assert read_input_file(path, 1000, "missing_image") == b"x" * 1000
    with pytest.raises(BadSample) as bad:
        read_input_file(path, 999, "missing_image")
    assert bad.value.reason == "too_large"
    os.symlink(path, tmp_path / "link.jpg")  # links to regular files are followed
    assert len(read_input_file(tmp_path / "link.jpg", 1000, "missing_image")) == 1000


def outside_images(tmp_path):
    """A valid image outside every input folder, by a relative climb and by absolute path."""
    secret = write(tmp_path / "secret" / "s.jpg", image_bytes(99))
    return secret


def test_coco_refuses_file_names_outside_the_images_folder(tiny_coco, tmp_path):
    secret = outside_images(tmp_path)
    captions = tiny_coco / "annotations" / "captions_train2017.json"
    data = json.loads(captions.read_text())
    data["images"] += [{"id": 7, "file_name": "../../../secret/s.jpg"}, {"id": 8, "file_name": str(secret)}]
    data["annotations"] += [
        {"id": 900, "image_id": 7, "caption": "climbs out"},
        {"id": 901, "image_id": 8, "caption": "absolute"},
    ]
    captions.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert build("build", "coco", str(tiny_coco), "--split", "train2017", "--out", str(out)) == 0
    reasons = rejected(out)
    assert reasons[f"{7:012d}"][0] == reasons[f"{8:012d}"][0] == "bad_metadata"
    assert "outside" in reasons[f"{7:012d}"][1] and "outside" in reasons[f"{8:012d}"][1]
    assert load_dataset(out)[1].column("key").to_pylist() == [f"{i:012d}" for i in (1, 2, 3)]


def test_karpathy_table_flickr_refuse_names_outside_their_folders(karpathy, tables, flickr_entities, tmp_path):
    secret = outside_images(tmp_path)
    # karpathy: filename climbing out, and filepath climbing out
    data = json.loads((karpathy / "dataset_flickr30k.json").read_text())
    data["images"] += [
        {"filename": "../../secret/s.jpg", "imgid": 20, "split": "train", "sentences": [{"raw": "out"}]},
        {"filepath": "../../secret", "filename": "s.jpg", "imgid": 21, "split": "train", "sentences": [{"raw": "out"}]},
        {"filename": str(secret), "imgid": 22, "split": "train", "sentences": [{"raw": "out"}]},
    ]
    write(karpathy / "k.json", json.dumps(data))
    assert (
        build(
            "build",
            "karpathy",
            str(karpathy / "k.json"),
            "--images",
            str(karpathy / "images"),
            "--out",
            str(tmp_path / "k"),
        )
        == 0
    )
    reasons = rejected(tmp_path / "k")
    assert {reasons[f"{i:09d}"][0] for i in (20, 21, 22)} == {"bad_metadata"}
    # table: relative climb and absolute path in the image column
    write(tables / "out.csv", f"path,text\nimages/p0.jpg,fine\n../secret/s.jpg,climbs\n{secret},absolute\n")
    assert (
        build(
            "build",
            "table",
            str(tables / "out.csv"),
            "--image-column",
            "path",
            "--caption-column",
            "text",
            "--out",
            str(tmp_path / "t"),
        )
        == 0
    )
    assert sorted(r for r, _ in rejected(tmp_path / "t").values()) == ["bad_metadata", "bad_metadata"]
    assert load_dataset(tmp_path / "t")[0].total_samples == 1
    # flickr30k entities: an id in the split file that climbs out of Sentences/ and images/
    write(tmp_path / "secret" / "s.txt", "[/EN#1/people A secret] .\n")
    write(flickr_entities / "val.txt", "101\n../../secret/s\n")
    assert (
        build("build", "flickr30k-entities", str(flickr_entities), "--split", "val", "--out", str(tmp_path / "f")) == 0
    )
    assert [r for r, _ in rejected(tmp_path / "f").values()] == ["bad_metadata"]
    assert load_dataset(tmp_path / "f")[1].column("image_id").to_pylist() == ["101"]
