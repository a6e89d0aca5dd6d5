"""A shard holding the same key twice (img2dataset tars can): the indexer lists the second copy as
`duplicate_key`, and every reading path (the loader with and without workers, `stream --decode`,
`stream` without decoding, a range starting inside the shard, a resumed epoch) delivers the key
once and counts the second copy as the bad sample `duplicate_key`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.errors import BadSample
from data_tools.loader import merge_rank_cursors
from data_tools.shard_reader import ShardReader
from tests.data_tools.conftest import build, image_bytes, img2dataset_tar
from tests.data_tools.test_loader import config, minilm, real_keys, run_ranks
from tests.data_tools.test_stream_cli import stream

KEYS = ["000000000", "000000001", "000000002", "000000003"]


@pytest.fixture(scope="module")
def twice(tmp_path_factory) -> Path:
    """Two img2dataset shards; shard 0 stores k1 a second time (other image, other caption) after k2."""
    root = tmp_path_factory.mktemp("dup") / "i2d"
    k0, k1, k2, k3 = KEYS
    img2dataset_tar(
        root / "00000.tar",
        [
            (k0, image_bytes(0), "zero", {"key": k0}),
            (k1, image_bytes(1), "one", {"key": k1}),
            (k2, image_bytes(2), "two", {"key": k2}),
            (k1, image_bytes(9), "one again", {"key": k1}),
        ],
    )
    img2dataset_tar(root / "00001.tar", [(k3, image_bytes(3), "three", {"key": k3})])
    out = root.parent / "index"
    assert build("build", "img2dataset", str(root), "--out", str(out)) == 0
    return out


def test_the_index_lists_the_second_copy(twice):
    rejected = [json.loads(line) for line in (twice / "rejected.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in rejected] == [(KEYS[1], "duplicate_key")]
    assert json.loads((twice / "dataset.json").read_text())["total_samples"] == 5  # the tar keeps it


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_delivers_the_key_once_and_counts_the_copy(twice, workers):
    (batches,) = run_ranks(config(twice, tokenizer=minilm(), batch_size=2, workers=workers), world=1)
    assert sorted(real_keys(batches)) == KEYS
    assert batches[-1]["bad_samples"] == {"duplicate_key": 1}


@pytest.mark.parametrize("world", [1, 3, 5])
def test_stream_with_and_without_decoding_lists_it_once(twice, capsys, world):
    """world 3 and 5 with batch 1: ranges start inside shard 0, one of them at the second copy."""
    for decode in (["--decode"], []):
        code, lines, err = stream(capsys, str(twice), "--world-size", str(world), "--batch-size", "1", *decode)
        assert code == 0
        assert sorted(k for _, _, k in lines) == KEYS, (decode, lines)
        assert err.count("duplicate_key") == 1


def test_a_range_starting_at_the_copy_skips_it(twice):
    from data_tools.manifest import load_dataset_info

    info = load_dataset_info(twice)
    reader = ShardReader([info.resolve(twice, info.shards[0].location)])
    try:
        with pytest.raises(BadSample) as bad:
            reader.fetch(0, 3)  # opened here: k0, k1, k2 are passed by their headers
        assert bad.value.reason == "duplicate_key"
        assert reader.fetch(0, 1)["__key__"] == KEYS[1]  # reopened: the first copy is delivered
    finally:
        reader.close()


def test_resume_delivers_the_key_once(twice):
    cfg = config(twice, tokenizer=minilm(), batch_size=1, shuffle_block=1)
    full = run_ranks(cfg, world=2)
    first = run_ranks(cfg, world=2, limit=1)
    rest = run_ranks(cfg, world=2, cursor=merge_rank_cursors([r[-1]["cursor"] for r in first]))
    assert sorted(real_keys([b for r in full for b in r])) == KEYS
    assert sorted(real_keys([b for r in first + rest for b in r])) == KEYS
    assert sum(r[-1]["bad_samples"].get("duplicate_key", 0) for r in first + rest if r) == 1
