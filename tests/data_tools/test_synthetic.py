"""Synthetic relational scenes: exact boxes and phrase links, true captions, false negatives,
determinism for any worker count, and the dataset's own tokenizer."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from data_tools import synthetic
from data_tools.manifest import load_dataset
from tests.data_tools.conftest import build, read_samples

RELATION_RE = re.compile(r" (left of|right of|above|below) ")


def holds(rel: str, a: list[int], b: list[int]) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return {
        "left of": ax + aw <= bx,
        "right of": bx + bw <= ax,
        "above": ay + ah <= by,
        "below": by + bh <= ay,
    }[rel]


def phrase_referent(phrase: str, shapes: list[synthetic.Shape]) -> list[int]:
    """Indices of the shapes a noun phrase ("a small red circle") truly describes."""
    words = phrase.split()[1:]
    return [
        i
        for i, s in enumerate(shapes)
        if words[-1] == s.kind and words[-2] == s.colour and (len(words) == 2 or words[0] == s.size)
    ]


def swap_kind(caption: str, negative: str) -> str | None:
    """ "relation" when the negative is the caption with its relation replaced by the converse,
    "colour" when it is the caption with the two phrases' colours exchanged (the same multiset of
    words, up to a/an), else None."""
    rel = RELATION_RE.search(caption).group(1)
    if negative == caption.replace(f" {rel} ", f" {synthetic.RELATIONS[rel]} ", 1):
        return "relation"
    words, other = (
        [w if w != "an" else "a" for w in t.split()] for t in (caption, negative)
    )  # a/an follows the colour
    changed = [(w, o) for w, o in zip(words, other) if w != o]
    if (
        len(words) == len(other)
        and sorted(words) == sorted(other)
        and len(changed) == 2
        and changed[0] == changed[1][::-1]
        and all(w in synthetic.COLOURS for w in changed[0])
    ):
        return "colour"
    return None


def test_swap_kind_tells_the_two_negatives_from_anything_else():
    caption = "a small red circle left of a blue square"
    assert swap_kind(caption, "a small red circle right of a blue square") == "relation"
    assert swap_kind(caption, "a small blue circle left of a red square") == "colour"
    assert swap_kind("an orange circle above a red square", "a red circle above an orange square") == "colour"
    for other in (
        caption,
        "a small red square left of a blue circle",
        "a small red circle above a blue square",
        "a large red circle left of a blue square",
        "a blue square right of a small red circle",
    ):
        assert swap_kind(caption, other) is None, other


@pytest.mark.parametrize("index", range(40))
def test_scene_captions_true_negatives_false_and_boxes_exact(index):
    scene = synthetic.render_scene(seed=7, index=index, image_size=64)
    assert 2 <= len(scene.shapes) <= 4 and 2 <= len(scene.captions) <= 3
    assert len({s.colour for s in scene.shapes}) == len(scene.shapes)
    pixels = np.asarray(Image.open(io.BytesIO(scene.image)).convert("RGB"))  # [H, W, 3]
    for s in scene.shapes:
        x, y, w, h = s.box
        ys, xs = np.nonzero(np.all(pixels == synthetic.COLOURS[s.colour], axis=-1))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h), s  # tight box
        lo, hi = synthetic.SIZES[s.size]
        assert round(lo * 64) <= w <= round(hi * 64)
    assert len(scene.negatives) == len(scene.captions)
    for ci, caption in enumerate(scene.captions):
        links = [p for p in scene.phrases if p["caption"] == ci]
        assert len(links) == 2
        texts = [caption[p["span"][0] : p["span"][1]] for p in links]
        for text, link in zip(texts, links):
            assert phrase_referent(text, scene.shapes) == link["boxes"]  # exact, unique referent
        rel = RELATION_RE.search(caption).group(1)
        a, b = (scene.boxes[link["boxes"][0]] for link in links)
        assert holds(rel, a, b), caption
        ((neg_index, negative, kind),) = [n for n in scene.negatives if n[0] == ci]
        # the recorded kind is the edit: a relation swap changes only the relation words, an attribute
        # swap exchanges the two phrases' colours and keeps the relation
        assert (
            negative != caption
            and swap_kind(caption, negative) == {"relation": "relation", "attribute": "colour"}[kind]
        )
        if kind == "relation":
            assert RELATION_RE.search(negative).group(1) == synthetic.RELATIONS[rel]
            assert RELATION_RE.sub(" _ ", negative) == RELATION_RE.sub(" _ ", caption)
        else:
            assert kind == "attribute" and RELATION_RE.search(negative).group(1) == rel
            colour_a, colour_b = (scene.shapes[link["boxes"][0]].colour for link in links)
            assert [w for w in negative.split() if w in synthetic.COLOURS] == [colour_b, colour_a]
        # the negative is false: its phrases name no shape, or the relation fails between them
        neg_rel = RELATION_RE.search(negative).group(1)
        head, tail = RELATION_RE.split(negative)[0], RELATION_RE.split(negative)[2]
        np_a = head.removeprefix("there is ").removesuffix(" is")
        ra, rb = phrase_referent(np_a, scene.shapes), phrase_referent(tail, scene.shapes)
        assert not any(holds(neg_rel, scene.boxes[i], scene.boxes[j]) for i in ra for j in rb), negative


def test_scene_is_a_function_of_seed_and_index():
    assert synthetic.render_scene(1, 5).image == synthetic.render_scene(1, 5).image
    assert synthetic.render_scene(1, 5).captions == synthetic.render_scene(1, 5).captions
    assert synthetic.render_scene(1, 5).image != synthetic.render_scene(2, 5).image
    big = synthetic.render_scene(1, 5, image_size=224)
    assert Image.open(io.BytesIO(big.image)).size == (224, 224)


def test_build_synthetic_layout_and_determinism(tmp_path):
    args = ["build", "synthetic", "--samples", "120", "--seed", "5", "--shard-samples", "50"]
    assert build(*args, "--out", str(tmp_path / "one")) == 0
    assert build(*args, "--out", str(tmp_path / "two"), "--workers", "2") == 0
    one, two = tmp_path / "one", tmp_path / "two"
    info, table = load_dataset(one)
    assert (
        info.builder == "synthetic" and info.total_samples == 120 and [s.samples for s in info.shards] == [50, 50, 20]
    )
    assert [s.location for s in info.shards] == [f"shards/synthetic-{i:06d}.tar" for i in range(3)]
    assert (one / "dataset.json").read_bytes() == (two / "dataset.json").read_bytes()
    for s in info.shards:
        assert (one / s.location).read_bytes() == (two / s.location).read_bytes()
    assert (one / "manifest.parquet").read_bytes() == (two / "manifest.parquet").read_bytes()
    assert not (one / ".build").exists() and (one / "rejected.jsonl").read_text() == ""

    samples = read_samples(one)
    assert sorted(samples) == table.column("key").to_pylist() == [f"s5-{i:09d}" for i in range(120)]
    assert set(table.column("split").to_pylist()) == {"train"}
    for key, s in samples.items():
        meta = s["meta"]
        assert meta["image_id"] == key and meta["source"] == "synthetic" and meta["split"] == "train"
        assert s["txt"] == meta["captions"][0] and (meta["width"], meta["height"]) == (64, 64)
        scene = synthetic.render_scene(5, int(key.removeprefix("s5-")))
        assert s["image"] == scene.image and meta["boxes"] == scene.boxes and meta["phrases"] == scene.phrases
        assert meta["negatives"] == scene.negatives and {n[2] for n in meta["negatives"]} <= set(
            synthetic.NEGATIVE_KINDS
        )
        assert s["row"]["num_captions"] == len(meta["captions"]) and s["row"]["image_bytes"] == len(s["image"])

    other = tmp_path / "other"
    assert (
        build("build", "synthetic", "--samples", "120", "--seed", "6", "--shard-samples", "50", "--out", str(other))
        == 0
    )
    assert json.loads((other / "dataset.json").read_text())["sha256"] != info.sha256


def test_synthetic_tokenizer_covers_the_grammar(tmp_path):
    from transformers import AutoTokenizer

    assert build("build", "synthetic", "--samples", "30", "--seed", "0", "--out", str(tmp_path / "d")) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "d" / "tokenizer"))
    assert [
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.mask_token_id,
    ] == [0, 1, 2, 3, 4]
    for s in read_samples(tmp_path / "d").values():
        for text in s["meta"]["captions"] + [n[1] for n in s["meta"]["negatives"]]:
            ids = tokenizer(text)["input_ids"]
            assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids
            assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == text.split()  # one token per grammar word
    again = tmp_path / "again"
    assert build("build", "synthetic", "--samples", "5", "--seed", "9", "--out", str(again)) == 0
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (again / "tokenizer" / name).read_bytes() == (tmp_path / "d" / "tokenizer" / name).read_bytes()


@pytest.mark.parametrize(
    "bad",
    [
        ["--samples", "0"],
        ["--samples", "5", "--image-size", "32"],
        ["--samples", "5", "--shard-bytes", "1M"],
        ["--samples", "5", "--split", ""],
        ["--samples", "5", "--seed", "-1"],
    ],
)
def test_synthetic_bad_arguments_exit_2(tmp_path, capsys, bad):
    assert build("build", "synthetic", *bad, "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("data_tools: error: --")


def test_kinds_of_negatives_are_both_present():
    kinds = [n[2] for i in range(30) for n in synthetic.render_scene(3, i).negatives]
    assert set(kinds) == set(synthetic.NEGATIVE_KINDS) and 0.3 < kinds.count("relation") / len(kinds) < 0.7


def test_seeds_never_share_keys_or_image_ids_and_split_is_recorded(tmp_path):
    """A held-out set beside a training set (or two parts of a mixture) must not collide."""
    assert build("build", "synthetic", "--samples", "6", "--seed", "0", "--out", str(tmp_path / "train")) == 0
    assert (
        build("build", "synthetic", "--samples", "6", "--seed", "1", "--split", "test", "--out", str(tmp_path / "test"))
        == 0
    )
    train, test = read_samples(tmp_path / "train"), read_samples(tmp_path / "test")
    assert not set(train) & set(test)
    assert not {s["meta"]["image_id"] for s in train.values()} & {s["meta"]["image_id"] for s in test.values()}
    assert {s["meta"]["split"] for s in test.values()} == {"test"} and {s["meta"]["split"] for s in train.values()} == {
        "train"
    }
    _, table = load_dataset(tmp_path / "test")
    assert table.column("split").to_pylist() == ["test"] * 6
    assert json.loads((tmp_path / "test" / "dataset.json").read_text())["arguments"]["split"] == "test"


def test_readers_take_negatives_with_and_without_kind():
    """The json may hold [index, text, kind] (synthetic) or the older [index, text]: both decode."""
    from data_tools.decode import decode_sample

    png = synthetic.render_scene(0, 0).image
    for negatives, kind in (
        ([[0, "a red circle above a blue square", "relation"]], "relation"),
        ([[0, "a red circle above a blue square"]], None),
    ):
        meta = {"captions": ["a red circle below a blue square"], "negatives": negatives}
        sample = decode_sample({"__key__": "k", "png": png, "json": json.dumps(meta).encode()}, seed=0, epoch=0)
        assert sample["negative"] == "a red circle above a blue square" and sample["negative_kind"] == kind


def reference_truth(text: str, shapes: list[synthetic.Shape]) -> bool:
    """Read a text as the tests above do: some shape each phrase describes stands in the relation."""
    rel = RELATION_RE.search(text).group(1)
    head, _, tail = RELATION_RE.split(text)
    ra = phrase_referent(head.removeprefix("there is ").removesuffix(" is"), shapes)
    rb = phrase_referent(tail, shapes)
    return any(holds(rel, list(shapes[i].box), list(shapes[j].box)) for i in ra for j in rb if i != j)


@pytest.mark.parametrize("image_size", [64, 100, 224])
def test_truth_table_from_stored_metadata_agrees_with_a_direct_reading(image_size, monkeypatch):
    """Evaluation decides which captions are true of which scene from each sample's stored json (boxes,
    box_labels, width; the size word from the box side): shapes come back exactly, own captions are
    true, negatives false, and every (scene, text) cell equals the direct reading of the tests above."""
    scenes = [synthetic.render_scene(seed=5, index=i, image_size=image_size) for i in range(60)]
    stored = [
        json.loads(
            json.dumps({"source": "synthetic", "boxes": s.boxes, "box_labels": s.box_labels, "width": image_size})
        )
        for s in scenes
    ]
    shapes = [synthetic.shapes_from_metadata(meta) for meta in stored]
    assert shapes == [s.shapes for s in scenes]
    texts = [c for s in scenes for c in s.captions] + [n[1] for s in scenes for n in s.negatives]
    table = synthetic.truth_table(texts, shapes)  # [60, T]
    reference = np.array([[reference_truth(t, s.shapes) for t in texts] for s in scenes])
    assert (table == reference).all()
    monkeypatch.setattr(synthetic, "TRUTH_CHUNK", 7)  # scenes in chunks: the same table
    assert (synthetic.truth_table(texts, shapes) == table).all()
    for i, scene in enumerate(scenes):
        assert all(synthetic.caption_holds(c, shapes[i]) for c in scene.captions)
        assert not any(synthetic.caption_holds(n[1], shapes[i]) for n in scene.negatives)
    assert table[:, : sum(len(s.captions) for s in scenes)].sum() > sum(
        len(s.captions) for s in scenes
    )  # foreign true captions exist


def test_truth_table_refuses_what_the_grammar_cannot_say():
    shapes = synthetic.render_scene(seed=5, index=0, image_size=64).shapes
    assert synthetic.caption_holds("a red circle near a blue square", shapes) is None
    assert synthetic.truth_table(["a photo of a dog"], [shapes]) is None
    assert (
        synthetic.shapes_from_metadata(
            {"source": "coco", "boxes": [[0, 0, 4, 4]], "box_labels": ["red circle"], "width": 64}
        )
        is None
    )
    assert (
        synthetic.shapes_from_metadata(
            {"source": "synthetic", "boxes": [[0, 0, 4, 4]], "box_labels": ["dog"], "width": 64}
        )
        is None
    )
