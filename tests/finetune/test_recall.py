"""Recall against a brute-force reference: random score matrices with many ties, several captions per image."""

from __future__ import annotations

import pytest
import torch

from finetune import recall as R


def brute_rank(row: list[float], target: int) -> int:
    """Rank of `target` in `row`: items scored higher, plus equal items earlier in the gallery."""
    return sum(1 for g, s in enumerate(row) if s > row[target] or (s == row[target] and g < target))


def brute_recall(scores_i2t: torch.Tensor, caption_image: list[int], scores_t2i: torch.Tensor) -> dict[str, float]:
    """Each caption true of its own image only."""
    truth = [[caption_image[c] == i for c in range(scores_i2t.shape[1])] for i in range(scores_i2t.shape[0])]
    return brute_any_true(scores_i2t, truth, scores_t2i)


def brute_any_true(scores_i2t: torch.Tensor, truth, scores_t2i: torch.Tensor) -> dict[str, float]:
    """A query's rank: its best-ranked true gallery item's (gallery size when it has none)."""
    images, captions = scores_i2t.shape
    text = [
        min([brute_rank(scores_i2t[i].tolist(), c) for c in range(captions) if truth[i][c]], default=captions)
        for i in range(images)
    ]
    image = [
        min([brute_rank(scores_t2i[:, c].tolist(), i) for i in range(images) if truth[i][c]], default=images)
        for c in range(captions)
    ]
    out = {}
    for k in (1, 5, 10):
        out[f"i2t@{k}"] = sum(r < k for r in text) / images
        out[f"t2i@{k}"] = sum(r < k for r in image) / captions
    six = [out[f"{d}@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    out["mean"], out["rsum"] = sum(six) / 6, 100 * sum(six)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_recall_equals_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    images = int(torch.randint(5, 25, (1,), generator=g))
    per_image = torch.randint(1, 5, (images,), generator=g)  # several captions per image
    caption_image = torch.repeat_interleave(torch.arange(images), per_image)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]  # captions not grouped
    levels = 3 if seed % 2 else 6  # few distinct values: ties everywhere
    scores_i2t = torch.randint(levels, (images, len(caption_image)), generator=g).float()
    scores_t2i = torch.randint(levels, (images, len(caption_image)), generator=g).float()
    got = R.recall(scores_i2t, caption_image, scores_t2i)
    want = brute_recall(scores_i2t, caption_image.tolist(), scores_t2i)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_ties_go_to_the_earlier_gallery_item():
    # A constant model: every image query ranks captions in gallery order, every caption ranks images likewise.
    caption_image = torch.tensor([1, 0, 0, 2])
    scores = torch.zeros(3, 4)
    i2t = R.text_retrieval_ranks(scores, caption_image)
    t2i = R.image_retrieval_ranks(scores, caption_image)
    assert i2t.tolist() == [1, 0, 3]  # image 0's first caption is at gallery index 1
    assert t2i.tolist() == [1, 0, 0, 2]


def test_perfect_and_reversed_scores():
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    perfect = (caption_image[None, :] == torch.arange(3)[:, None]).float()
    result = R.recall(perfect, caption_image)
    assert all(result[f"{d}@{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert result["rsum"] == pytest.approx(600.0)
    assert R.recall(-perfect, caption_image)["t2i@1"] == 0.0


def test_fold_average_is_the_mean_of_per_fold_recalls():
    g = torch.Generator().manual_seed(3)
    caption_image = torch.arange(20).repeat_interleave(2)  # 20 images, 2 captions each
    scores = torch.randn(20, 40, generator=g)
    folded = R.fold_average(scores, caption_image, folds=4)
    parts = [
        R.recall(scores[5 * f : 5 * f + 5, 10 * f : 10 * f + 10], caption_image[10 * f : 10 * f + 10] - 5 * f)
        for f in range(4)
    ]
    for key in folded:
        assert folded[key] == pytest.approx(sum(p[key] for p in parts) / 4)
    assert folded["i2t@1"] != pytest.approx(R.recall(scores, caption_image)["i2t@1"])  # smaller galleries: easier
    with pytest.raises(ValueError):
        R.fold_average(scores, caption_image, folds=3)


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        R.recall(torch.tensor([[float("nan")]]), torch.tensor([0]))


@pytest.mark.parametrize("seed", range(4))
def test_recall_any_true_against_brute_force_and_equal_to_recall_on_own_captions(seed):
    g = torch.Generator().manual_seed(seed)
    images, captions = 13, 31
    caption_image = torch.sort(torch.randint(0, images, (captions,), generator=g)).values
    scores_i2t = torch.randint(0, 4, (images, captions), generator=g).float()  # many ties
    scores_t2i = torch.randint(0, 4, (images, captions), generator=g).float()
    own = caption_image[None, :] == torch.arange(images)[:, None]
    assert R.recall_any_true(scores_i2t, own, scores_t2i) == pytest.approx(
        R.recall(scores_i2t, caption_image, scores_t2i)
    )
    truth = own | (torch.rand(images, captions, generator=g) < 0.15)  # foreign captions true as well
    got = R.recall_any_true(scores_i2t, truth, scores_t2i)
    assert got == pytest.approx(brute_any_true(scores_i2t, truth.tolist(), scores_t2i))
    plain = R.recall(scores_i2t, caption_image, scores_t2i)
    assert all(got[key] >= plain[key] for key in plain)  # more true answers never lower a recall
