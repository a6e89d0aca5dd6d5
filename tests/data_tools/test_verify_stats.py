"""verify (passes on a fresh build, names each kind of damage, exit 3), stats (values), and tokenizer
training over a dataset's captions."""

from __future__ import annotations

import json
import shutil

import pytest

from data_tools.schema import DATASET_FILE
from tests.data_tools.conftest import build


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "d"
    assert (
        build("build", "synthetic", "--samples", "60", "--seed", "2", "--shard-samples", "25", "--out", str(out)) == 0
    )
    return out


def damaged(source, tmp_path, how):
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    shard = out / "shards" / "synthetic-000001.tar"
    data = bytearray(shard.read_bytes())
    if how == "flip":  # one byte inside the first sample's PNG data (its IHDR chunk)
        from data_tools.manifest import load_manifest

        row = next(r for r in load_manifest(out).to_pylist() if r["shard"] == 1)
        data[json.loads(row["members"])["png"][0] + 20] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "truncate":
        shard.write_bytes(bytes(data[:4096]))
    elif how == "delete":
        shard.unlink()
    elif how == "count":
        info = json.loads((out / DATASET_FILE).read_text())
        info["shards"][1]["samples"] += 1
        info["total_samples"] += 1
        (out / DATASET_FILE).write_text(json.dumps(info))
    return out


def test_verify_fresh_build(synthetic_dataset, capsys):
    assert build("verify", str(synthetic_dataset)) == 0
    assert capsys.readouterr().out.strip().endswith("3 shards, 60 samples (sizes, hashes, keys, offsets, decoding): OK")
    assert build("verify", str(synthetic_dataset), "--workers", "2", "--no-decode") == 0


@pytest.mark.parametrize(
    "how, expected",
    [
        ("flip", ["sha256 differs", "is bad (decode_error"]),
        ("truncate", ["unreadable"]),
        ("delete", ["missing"]),
        ("count", ["25 samples, dataset.json and the manifest say 26"]),
    ],
)
def test_verify_names_the_damage(synthetic_dataset, tmp_path, capsys, how, expected):
    out = damaged(synthetic_dataset, tmp_path, how)
    code = build("verify", str(out))
    text = capsys.readouterr()
    if how == "count":  # the manifest no longer matches dataset.json: refused up front, one line
        assert code == 2 and "60 rows but dataset.json says 61 samples" in text.err
        return
    assert code == 3
    lines = text.out.strip().splitlines()
    assert all("shard 1 " in line for line in lines[:-1]) and len(lines) == len(expected) + 1
    for line, part in zip(lines, expected):
        assert part in line
    assert lines[-1].endswith(f"{len(expected)} problems")


def test_verify_streams_pipe_locations(synthetic_dataset, tmp_path, capsys):
    """Shards listed as `pipe:` commands (remote storage) are streamed with --allow-pipe: size, hash, keys, decoding."""
    out = tmp_path / "remote"
    shutil.copytree(synthetic_dataset, out)
    info = json.loads((out / DATASET_FILE).read_text())
    for shard in info["shards"]:
        shard["location"] = f"pipe:cat {out / shard['location']}"
    (out / DATASET_FILE).write_text(json.dumps(info))
    assert build("verify", str(out), "--allow-pipe") == 0
    (out / "shards" / "synthetic-000002.tar").write_bytes(b"")
    assert build("verify", str(out), "--allow-pipe") == 3
    assert "shard 2 (pipe:cat" in capsys.readouterr().out


def test_verify_missing_dataset_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert build("verify", str(tmp_path / "empty")) == 2
    assert capsys.readouterr().err.strip() == (
        f"data_tools: error: {tmp_path / 'empty' / DATASET_FILE}: missing "
        "(not a finished dataset: build it, or run merge after a parts build)"
    )
    (tmp_path / "empty" / DATASET_FILE).write_text("[1, 2]")
    assert build("verify", str(tmp_path / "empty")) == 3  # present but malformed: the data is wrong (exit 3)
    assert "malformed dataset.json" in capsys.readouterr().err


def test_verify_img2dataset_expects_its_rejects(img2dataset_dir, tmp_path):
    out = tmp_path / "idx"
    assert build("build", "img2dataset", str(img2dataset_dir), "--out", str(out)) == 0
    assert build("verify", str(out)) == 0  # the corrupt sample is in rejected.jsonl


def test_stats_values(synthetic_dataset, capsys):
    from data_tools.stats import iter_metadata

    assert build("stats", str(synthetic_dataset), "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    metas = [meta for _, meta in iter_metadata(synthetic_dataset)]
    words = [len(c.split()) for m in metas for c in m["captions"]]
    assert stats["samples"] == 60 and stats["shards"] == 3 and stats["splits"] == {"train": 60}
    assert stats["captions"] == len(words) and stats["caption_words"]["max"] == max(words)
    assert stats["with_boxes"] == stats["with_phrases"] == stats["with_negatives"] == 60
    assert stats["boxes"] == sum(len(m["boxes"]) for m in metas)
    assert stats["width"]["min"] == stats["width"]["max"] == 64
    assert stats["samples_per_shard"]["min"] == 10 and stats["samples_per_shard"]["max"] == 25
    assert build("stats", str(synthetic_dataset)) == 0
    assert "60 samples in 3 shards" in capsys.readouterr().out


def test_tokenizer_training(tiny_coco, tmp_path):
    from transformers import AutoTokenizer

    data = tmp_path / "d"
    assert build("build", "coco", str(tiny_coco), "--out", str(data)) == 0
    assert build("tokenizer", str(data), "--vocab-size", "120", "--out", str(tmp_path / "tok")) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tokenizer) <= 120
    ids = tokenizer("A Brown dog resting")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids
    assert "".join(t.removeprefix("##") for t in tokenizer.convert_ids_to_tokens(ids[1:-1])) == "abrowndogresting"
    assert build("tokenizer", str(data), "--vocab-size", "3", "--out", str(tmp_path / "t2")) == 2


@pytest.mark.parametrize(
    "shard, expected",
    [
        (7, "1 rows name shard 7, but dataset.json lists 3 shards (0 to 2)"),
        (2, "24 rows for shard 1 (shards/synthetic-000001.tar) but dataset.json says 25 samples"),
    ],
)
def test_a_manifest_row_naming_another_shard_is_one_line(synthetic_dataset, tmp_path, capsys, shard, expected):
    """A manifest whose `shard` column disagrees with dataset.json (an index past its shards, or rows moved
    between shards) is refused before any reader indexes a shard with it: one line, exit 2."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "moved"
    shutil.copytree(synthetic_dataset, out)
    table = pq.read_table(out / "manifest.parquet")
    column = table.column("shard").to_pylist()
    column[column.index(1)] = shard  # the first row of shard 1 now names another shard
    table = table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(column, pa.int32()))
    pq.write_table(table, out / "manifest.parquet")
    for command in (("verify", str(out)), ("stats", str(out))):
        assert build(*command) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
