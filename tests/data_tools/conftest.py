"""Tiny inputs for the builder tests, written into a temporary folder: generated JPEGs, a COCO layout,
a Karpathy json, a Flickr30k Entities sample, CSV/TSV/Parquet tables, a name.jpg + name.txt folder
and an img2dataset-style tar. Each fixture plants the bad cases the builders must survive."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> bytes:
    """A distinct small image (noise seeded by `seed`)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def build(*argv: str) -> int:
    """Run `python -m data_tools ...` in-process (fast; the CLI tests use real subprocesses)."""
    from data_tools.__main__ import main
    from data_tools.errors import run_cli

    return run_cli(main, list(argv))


def read_samples(dataset: Path) -> dict[str, dict]:
    """key -> {"meta": json dict, "image": bytes, "ext": str, "txt": str} read through the manifest offsets."""
    from data_tools.manifest import load_dataset

    info, table = load_dataset(dataset)
    samples = {}
    for row in table.to_pylist():
        members = json.loads(row["members"])
        with open(info.resolve(dataset, info.shards[row["shard"]].location), "rb") as f:

            def member(ext):
                f.seek(members[ext][0])
                return f.read(members[ext][1])

            ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in members)
            samples[row["key"]] = {
                "meta": json.loads(member("json")),
                "image": member(ext),
                "ext": ext,
                "txt": member("txt").decode("utf-8"),
                "row": row,
            }
    return samples


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    """COCO layout, split train2017: 5 images listed; image 4 duplicates image 1's bytes, image 5's
    file is missing, a 6th file is not an image; one caption is blank."""
    root = tmp_path / "coco"
    imgs = root / "images" / "train2017"
    for i in (1, 2, 3):
        write(imgs / f"{i:012d}.jpg", image_bytes(i, (64 + 8 * i, 48)))
    write(imgs / f"{4:012d}.jpg", (imgs / f"{1:012d}.jpg").read_bytes())
    write(imgs / f"{6:012d}.jpg", b"this is not a jpeg")
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64 + 8 * i, "height": 48} for i in (1, 2, 3, 4, 5, 6)]
    images[3]["width"] = 72  # image 4 is image 1's bytes
    caps = [
        (1, "a dog on a sofa"),
        (1, "a brown dog resting"),
        (2, "two cats"),
        (2, "   "),
        (3, "a red bus"),
        (4, "a dog lying on a couch"),
        (5, "a missing picture"),
        (6, "a broken file"),
    ]
    annotations = [{"id": 100 + n, "image_id": i, "caption": c} for n, (i, c) in enumerate(caps)]
    write(root / "annotations" / "captions_train2017.json", json.dumps({"images": images, "annotations": annotations}))
    instances = [
        {"id": 1, "image_id": 1, "bbox": [4.0, 6.0, 20.0, 10.0], "category_id": 18},
        {"id": 2, "image_id": 3, "bbox": [0.0, 0.0, 30.5, 12.0], "category_id": 6},
    ]
    categories = [{"id": 18, "name": "dog"}, {"id": 6, "name": "bus"}]
    write(
        root / "annotations" / "instances_train2017.json",
        json.dumps({"images": images, "annotations": instances, "categories": categories}),
    )
    return root


@pytest.fixture
def karpathy(tmp_path: Path) -> Path:
    """A Karpathy-split json (Flickr30k flavour: no filepath) with its images folder."""
    root = tmp_path / "karpathy"
    entries = []
    for i, split in enumerate(["train", "train", "val", "test", "restval"]):
        write(root / "images" / f"{1000 + i}.jpg", image_bytes(10 + i))
        entries.append(
            {
                "filename": f"{1000 + i}.jpg",
                "imgid": i,
                "split": split,
                "sentences": [
                    {"raw": f"caption {j} of image {i} .", "tokens": [], "sentid": 5 * i + j} for j in range(2)
                ],
            }
        )
    entries.append(
        {
            "filename": "9999.jpg",
            "imgid": 9,
            "split": "train",
            "sentences": [{"raw": "gone", "tokens": [], "sentid": 99}],
        }
    )
    write(root / "dataset_flickr30k.json", json.dumps({"dataset": "flickr30k", "images": entries}))
    return root


FLICKR_SENTENCES = {
    "101": [
        "[/EN#1/people A man] in [/EN#2/clothing an orange hat] looks at [/EN#3/other something] .",
        "[/EN#1/people A person] wears [/EN#2/clothing a hat] .",
    ],
    "102": ["[/EN#7/animals Two dogs] run on [/EN#8/scene the grass] ."],
}


@pytest.fixture
def flickr_entities(tmp_path: Path) -> Path:
    """Flickr30k Entities: Sentences/*.txt markup, Annotations/*.xml boxes, images/*.jpg, split files.
    Entity 3 has no box, entity 7 has two boxes, entity 8 is a scene; image 103 has a broken xml."""
    root = tmp_path / "flickr"
    for image_id, lines in FLICKR_SENTENCES.items():
        write(root / "Sentences" / f"{image_id}.txt", "\n".join(lines) + "\n")
        write(root / "images" / f"{image_id}.jpg", image_bytes(int(image_id), (100, 80)))
    write(
        root / "Annotations" / "101.xml",
        """<annotation><size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>1</name><bndbox><xmin>10</xmin><ymin>5</ymin><xmax>40</xmax><ymax>70</ymax></bndbox></object>
<object><name>2</name><bndbox><xmin>15</xmin><ymin>5</ymin><xmax>30</xmax><ymax>15</ymax></bndbox></object>
<object><name>3</name><nobndbox>1</nobndbox></object></annotation>""",
    )
    write(
        root / "Annotations" / "102.xml",
        """<annotation><size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>7</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>
<object><name>7</name><bndbox><xmin>50</xmin><ymin>40</ymin><xmax>99</xmax><ymax>79</ymax></bndbox></object>
<object><name>8</name><scene>1</scene></object></annotation>""",
    )
    write(root / "Sentences" / "103.txt", "[/EN#1/people A woman] sings .\n")
    write(root / "images" / "103.jpg", image_bytes(103))
    write(root / "Annotations" / "103.xml", "<annotation><size>")
    write(root / "train.txt", "101\n102\n103\n")
    write(root / "test.txt", "102\n")
    return root


@pytest.fixture
def tables(tmp_path: Path) -> Path:
    """images/ plus the same 4 rows as CSV, TSV and Parquet: one missing file, one empty caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "table"
    for i in range(3):
        write(root / "images" / f"p{i}.jpg", image_bytes(30 + i))
    rows = {
        "path": ["images/p0.jpg", "images/p1.jpg", "images/p2.jpg", "images/none.jpg"],
        "text": ["first photo", "second, with a comma", "", "missing"],
    }
    pq.write_table(pa.table(rows), root / "rows.parquet")
    lines = ["path,text"] + [f'{p},"{t}"' for p, t in zip(rows["path"], rows["text"])]
    write(root / "rows.csv", "\n".join(lines) + "\n")
    write(
        root / "rows.tsv", "\n".join(["path\ttext"] + [f"{p}\t{t}" for p, t in zip(rows["path"], rows["text"])]) + "\n"
    )
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """name.jpg beside name.txt: good pairs, a png, an orphan image, a non-UTF-8 caption, a truncated jpeg."""
    root = tmp_path / "folder"
    write(root / "a.jpg", image_bytes(40))
    write(root / "a.txt", "a photo of noise\n")
    write(root / "sub" / "b.png", image_bytes(41, fmt="PNG"))
    write(root / "sub" / "b.txt", "a png in a subfolder")
    write(root / "c.jpg", image_bytes(42))  # no caption file
    write(root / "d.jpg", image_bytes(43))
    write(root / "d.txt", b"caf\xe9 latin-1")
    write(root / "e.jpg", image_bytes(44, (200, 150))[:300])
    write(root / "e.txt", "truncated")
    return root


def img2dataset_tar(path: Path, samples: list[tuple[str, bytes | None, str, dict]]) -> Path:
    """A tar as img2dataset writes it: <key>.jpg, <key>.txt, <key>.json per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, jpg, caption, meta in samples:
            for ext, data in (("jpg", jpg), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def img2dataset_dir(tmp_path: Path) -> Path:
    """Two img2dataset shards (00000.tar, 00001.tar) with stats files; one sample has a corrupt image."""
    root = tmp_path / "i2d"

    def meta(key, url):
        return {
            "url": url,
            "key": key,
            "status": "success",
            "error_message": None,
            "width": 40,
            "height": 30,
            "caption": "x",
        }

    img2dataset_tar(
        root / "00000.tar",
        [
            ("000000000", image_bytes(50), "a first web image", meta("000000000", "http://e/0.jpg")),
            ("000000001", image_bytes(51), "a second web image", meta("000000001", "http://e/1.jpg")),
            ("000000002", b"\xff\xd8garbage", "a broken download", meta("000000002", "http://e/2.jpg")),
        ],
    )
    img2dataset_tar(
        root / "00001.tar",
        [
            ("000010000", image_bytes(52), "a third web image", meta("000010000", "http://e/3.jpg")),
        ],
    )
    write(root / "00000_stats.json", json.dumps({"count": 3, "successes": 3}))
    write(root / "00001_stats.json", json.dumps({"count": 1, "successes": 1}))
    return root
