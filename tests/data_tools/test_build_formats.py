"""Builders for karpathy, flickr30k-entities, table (CSV/TSV/Parquet), folder and img2dataset on tiny
generated inputs: samples, captions, annotations, rejects by reason, and bad arguments (exit 2)."""

from __future__ import annotations

import json
import tarfile

import pytest

from data_tools.manifest import load_dataset
from tests.data_tools.conftest import build, img2dataset_tar, image_bytes, read_samples


def rejected(out) -> set[tuple[str, str]]:
    return {(r["key"], r["reason"]) for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}


def test_karpathy_splits(karpathy, tmp_path):
    out = tmp_path / "tr"
    assert (
        build(
            "build",
            "karpathy",
            str(karpathy / "dataset_flickr30k.json"),
            "--images",
            str(karpathy / "images"),
            "--split",
            "train,restval",
            "--out",
            str(out),
        )
        == 0
    )
    samples = read_samples(out)
    assert sorted(samples) == ["000000000", "000000001", "000000004"]
    assert samples["000000004"]["meta"]["split"] == "restval" and samples["000000004"]["meta"]["image_id"] == "1004"
    assert samples["000000001"]["meta"]["captions"] == ["caption 0 of image 1 .", "caption 1 of image 1 ."]
    assert rejected(out) == {("000000009", "missing_image")}
    out = tmp_path / "test"
    assert (
        build(
            "build",
            "karpathy",
            str(karpathy / "dataset_flickr30k.json"),
            "--images",
            str(karpathy / "images"),
            "--split",
            "test",
            "--out",
            str(out),
        )
        == 0
    )
    assert list(read_samples(out)) == ["000000003"]


def test_flickr30k_entities_phrases_and_boxes(flickr_entities, tmp_path):
    out = tmp_path / "f"
    assert build("build", "flickr30k-entities", str(flickr_entities), "--split", "train", "--out", str(out)) == 0
    samples = read_samples(out)
    assert sorted(samples) == ["101", "102"]
    m = samples["101"]["meta"]
    assert m["captions"] == ["A man in an orange hat looks at something .", "A person wears a hat ."]
    assert m["boxes"] == [[10.0, 5.0, 30.0, 65.0], [15.0, 5.0, 15.0, 10.0]]
    linked = [(m["captions"][p["caption"]][slice(*p["span"])], p["boxes"]) for p in m["phrases"]]
    assert linked == [
        ("A man", [0]),
        ("an orange hat", [1]),
        ("A person", [0]),
        ("a hat", [1]),
    ]  # "something" has no box
    m = samples["102"]["meta"]
    assert m["phrases"] == [{"caption": 0, "span": [0, 8], "boxes": [0, 1]}]  # two dogs, two boxes; the scene gets none
    assert rejected(out) == {("103", "bad_metadata")}
    resized = tmp_path / "r"
    assert (
        build(
            "build",
            "flickr30k-entities",
            str(flickr_entities),
            "--split",
            "test",
            "--resize",
            "50",
            "--out",
            str(resized),
        )
        == 0
    )
    assert read_samples(resized)["102"]["meta"]["boxes"] == [[0.0, 0.0, 10.0, 10.0], [25.0, 20.0, 24.5, 19.5]]


@pytest.mark.parametrize("name", ["rows.csv", "rows.tsv", "rows.parquet"])
def test_table_formats(tables, tmp_path, name):
    out = tmp_path / name
    assert (
        build(
            "build",
            "table",
            str(tables / name),
            "--image-column",
            "path",
            "--caption-column",
            "text",
            "--out",
            str(out),
        )
        == 0
    )
    samples = read_samples(out)
    assert [s["meta"]["captions"] for s in samples.values()] == [["first photo"], ["second, with a comma"]]
    assert [s["meta"]["image_id"] for s in samples.values()] == ["images/p0.jpg", "images/p1.jpg"]
    assert rejected(out) == {("000000002", "empty_caption"), ("000000003", "missing_image")}


def test_table_unknown_column_exit_2(tables, tmp_path, capsys):
    assert (
        build(
            "build",
            "table",
            str(tables / "rows.csv"),
            "--image-column",
            "path",
            "--caption-column",
            "caption",
            "--out",
            str(tmp_path / "o"),
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"data_tools: error: --caption-column caption: no such column in {tables / 'rows.csv'} (columns: path, text)"
    )


def test_folder_pairs(image_folder, tmp_path):
    out = tmp_path / "o"
    assert build("build", "folder", str(image_folder), "--split", "train", "--out", str(out)) == 0
    by_id = {s["meta"]["image_id"]: s for s in read_samples(out).values()}
    assert sorted(by_id) == ["a", "sub/b"]
    assert by_id["a"]["meta"]["captions"] == ["a photo of noise"] and by_id["sub/b"]["ext"] == "png"
    assert by_id["sub/b"]["image"] == (image_folder / "sub" / "b.png").read_bytes()
    assert {reason for _, reason in rejected(out)} == {"empty_caption", "bad_utf8", "decode_error"}
    info, _ = load_dataset(out)
    assert info.rejected == {"bad_utf8": 1, "decode_error": 1, "empty_caption": 1}


def test_decompression_bomb_limit_is_configurable(tmp_path):
    from tests.data_tools.conftest import write

    write(tmp_path / "in" / "big.png", image_bytes(1, (300, 300), fmt="PNG"))
    write(tmp_path / "in" / "big.txt", "big")
    write(tmp_path / "in" / "small.png", image_bytes(2, (20, 20), fmt="PNG"))
    write(tmp_path / "in" / "small.txt", "small")
    assert build("build", "folder", str(tmp_path / "in"), "--max-pixels", "10000", "--out", str(tmp_path / "o")) == 0
    assert rejected(tmp_path / "o") == {("000000000", "too_many_pixels")}
    assert build("build", "folder", str(tmp_path / "in"), "--max-pixels", "90000", "--out", str(tmp_path / "p")) == 0
    assert load_dataset(tmp_path / "p")[0].total_samples == 2


def test_img2dataset_index_in_place(img2dataset_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in img2dataset_dir.glob("*.tar")}
    out = tmp_path / "idx"
    assert build("build", "img2dataset", str(img2dataset_dir), "--out", str(out), "--workers", "2") == 0
    info, table = load_dataset(out)
    assert [s.location for s in info.shards] == [
        str((img2dataset_dir / n).resolve()) for n in ("00000.tar", "00001.tar")
    ]
    assert [s.samples for s in info.shards] == [3, 1] and table.num_rows == 4
    assert info.rejected == {"decode_error": 1} and rejected(out) == {("000000002", "decode_error")}
    assert {p.name: p.read_bytes() for p in img2dataset_dir.glob("*.tar")} == before  # tars untouched
    samples = read_samples(out)
    assert (
        samples["000000001"]["txt"] == "a second web image" and samples["000000001"]["meta"]["url"] == "http://e/1.jpg"
    )
    assert samples["000000001"]["image"] == image_bytes(51)
    row = samples["000010000"]["row"]
    assert (row["shard"], row["width"], row["height"], row["num_captions"]) == (1, 40, 30, 1)
    # indexed inside its own folder: locations relative to it
    assert build("build", "img2dataset", str(img2dataset_dir), "--out", str(img2dataset_dir)) == 0
    assert [s.location for s in load_dataset(img2dataset_dir)[0].shards] == ["00000.tar", "00001.tar"]


def test_img2dataset_refuses_pickles(tmp_path):
    root = tmp_path / "i2d"
    img2dataset_tar(root / "00000.tar", [("000000000", image_bytes(1), "fine", {"key": "000000000"})])
    with tarfile.open(root / "00001.tar", "w") as tar:
        import io

        for name, data in (
            ("000000001.jpg", image_bytes(2)),
            ("000000001.txt", b"has a pickle"),
            ("000000001.pth", b"\x80\x04"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert build("build", "img2dataset", str(root), "--out", str(tmp_path / "o")) == 0
    assert rejected(tmp_path / "o") == {("000000001", "refused_member")}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["folder", "{tmp}/nowhere"], "folder {tmp}/nowhere: no such folder"),
        (["karpathy", "{tmp}/none.json", "--images", "{tmp}"], "karpathy {tmp}/none.json: no such file"),
        (["karpathy", "{tmp}/k.json", "--images", "{tmp}", "--split", "dev"], "--split dev: expected one or more of"),
        (["flickr30k-entities", "{tmp}"], "Sentences: no such folder"),
        (["img2dataset", "{tmp}"], "no .tar files"),
        (["table", "{tmp}/k.json", "--image-column", "a"], "unknown extension '.json'"),
        (["synthetic", "--samples", "4", "--workers", "0"], "--workers=0: must be at least 1"),
        (["synthetic", "--samples", "4", "--part", "2", "--num-parts", "2"], "--part=2 --num-parts=2"),
    ],
)
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "k.json").write_text("{}")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert build("build", *argv, "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert not (tmp_path / "out" / "dataset.json").exists()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is never reached by a header check)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_configured_pixel_limit_decides_not_pils(recwarn):
    from data_tools.errors import BadSample
    from data_tools.images import open_image

    huge = png_header_only(20_000, 10_000)  # 200 MP: above PIL's own error threshold (2 x 89 MP)
    assert open_image(huge, max_pixels=300_000_000).size == (20_000, 10_000)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
    with pytest.raises(BadSample) as err:
        open_image(huge, max_pixels=64_000_000)
    assert err.value.reason == "too_many_pixels" and "20000x10000" in str(err.value)


def test_prepare_image_resize_keeps_aspect_and_look():
    import io

    import numpy as np
    from PIL import Image

    from data_tools.images import prepare_image

    coarse = np.random.default_rng(0).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    photo = Image.fromarray(coarse).resize((800, 600), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    photo.save(out, format="JPEG", quality=95)
    stored = prepare_image(out.getvalue(), max_side=100, quality=95)  # decoded at 1/4 scale, then resized
    assert (stored.width, stored.height, stored.extension) == (100, 75, "jpg") and stored.scale == (100 / 800, 75 / 600)
    got = np.asarray(Image.open(io.BytesIO(stored.data)).convert("RGB"), dtype=np.float64)
    want = np.asarray(photo.resize((100, 75), Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(got - want).mean() < 4.0  # same picture, within JPEG noise
    small = prepare_image(out.getvalue(), max_side=1000)
    assert small.data == out.getvalue() and small.scale == (1.0, 1.0)  # not enlarged, bytes kept
    gif = io.BytesIO()
    photo.save(gif, format="GIF")
    assert prepare_image(gif.getvalue()).extension == "jpg"  # formats shards do not store are re-encoded
