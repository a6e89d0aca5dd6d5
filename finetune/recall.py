"""Retrieval recall from score matrices: pure functions, no model, no IO.

Vocabulary (DESIGN.md 3 "Finetuning and evaluation"):
- gallery: the evaluation set's images (rows) and captions (columns); `caption_image[c]` is the one
  image caption c describes; an image has one or more captions.
- text retrieval (i2t, image query): the image counts at rank r when its best-ranked ground-truth
  caption is at rank r among all captions.
- image retrieval (t2i, caption query): each caption ranks all images; rank of its one image.
- R@K: share of queries whose rank r (0-based) is < K. Fractions in [0, 1].
- mean: the mean of the six R@K; rsum: their sum in percent (0..600), as papers report it.

Ties are broken by gallery order: between equal scores the lower gallery index ranks first (a
stable descending sort). So a model that outputs a constant gets rank = gallery index, the same on
every rank and launcher, never a random or optimistic draw.

Text and image retrieval may read different matrices (`rerank` ranks each direction's candidates on
its own), so every function takes `scores_i2t` and `scores_t2i`, both [images, captions].
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
CHUNK = 1024
"""Queries ranked at once (bounds the [chunk, gallery] rank tensor)."""


def _check(scores: Tensor, caption_image: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[1] != caption_image.shape[0]:
        raise ValueError(
            f"scores {tuple(scores.shape)} must be [images, captions] with captions = {caption_image.shape[0]}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: no ranking is defined")
    if caption_image.numel() and (caption_image.min() < 0 or caption_image.max() >= scores.shape[0]):
        raise ValueError("caption_image names an image outside the score matrix")


def positions(scores: Tensor) -> Tensor:
    """Rank (0-based) of every gallery item in every row: [Q, G] -> [Q, G] long.

    Descending by score, ties by gallery index (stable sort): rank[q, g] = #{h: s[q,h] > s[q,g]}
    + #{h < g: s[q,h] == s[q,g]}.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [Q, G] gallery index at each rank
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order).contiguous())
    return ranks


def _best_true_ranks(scores: Tensor, truth_rows: Callable[[int, int], Tensor]) -> Tensor:
    """[Q, G] scores -> [Q]: rank of each query's best-ranked true item (G when it has none).

    `truth_rows(lo, hi)` gives the bool truth [hi - lo, G] of queries lo..hi: queries go in chunks, so
    neither the [Q, G] rank tensor ([5K, 25K] long: 1 GB) nor a full truth matrix need exist at once.
    """
    out = []
    for lo in range(0, scores.shape[0], CHUNK):
        ranks = positions(scores[lo : lo + CHUNK])  # [chunk, G]
        truth = truth_rows(lo, lo + ranks.shape[0]).to(ranks.device)
        out.append(torch.where(truth, ranks, torch.full_like(ranks, scores.shape[1])).min(dim=1).values)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def text_retrieval_ranks(scores_i2t: Tensor, caption_image: Tensor) -> Tensor:
    """[images, captions] -> [images]: rank of each image's best-ranked ground-truth caption.

    An image without a caption gets rank = number of captions (never retrieved).
    """
    _check(scores_i2t, caption_image)
    return _best_true_ranks(
        scores_i2t, lambda lo, hi: caption_image[None, :] == torch.arange(lo, hi, device=caption_image.device)[:, None]
    )


def image_retrieval_ranks(scores_t2i: Tensor, caption_image: Tensor) -> Tensor:
    """[images, captions] -> [captions]: rank of each caption's image among all images."""
    _check(scores_t2i, caption_image)
    columns = scores_t2i.T  # [C, I]
    out = [
        positions(columns[lo : lo + CHUNK]).gather(1, caption_image.long()[lo : lo + CHUNK, None]).squeeze(1)
        for lo in range(0, columns.shape[0], CHUNK)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def recall_at(ranks: Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """{K: share of queries with rank < K}."""
    if ranks.numel() == 0:
        return {k: 0.0 for k in ks}
    return {k: float((ranks < k).double().mean()) for k in ks}


def _summary(i2t_ranks: Tensor, t2i_ranks: Tensor) -> dict[str, float]:
    out = {f"i2t@{k}": value for k, value in recall_at(i2t_ranks).items()}
    out.update({f"t2i@{k}": value for k, value in recall_at(t2i_ranks).items()})
    values = [out[f"{d}@{k}"] for d in DIRECTIONS for k in KS]
    out["mean"] = sum(values) / len(values)
    out["rsum"] = 100.0 * sum(values)
    return out


def recall(scores_i2t: Tensor, caption_image: Tensor, scores_t2i: Tensor | None = None) -> dict[str, float]:
    """R@1/5/10 both ways, mean and rsum.

    scores_i2t [images, captions] ranks captions per image; scores_t2i (default: the same matrix)
    ranks images per caption; caption_image [captions] long. Keys: "i2t@1" .. "t2i@10", "mean", "rsum".
    """
    caption_image = caption_image.long()
    scores_t2i = scores_i2t if scores_t2i is None else scores_t2i
    return _summary(text_retrieval_ranks(scores_i2t, caption_image), image_retrieval_ranks(scores_t2i, caption_image))


def truth_ranks(scores: Tensor, truth: Tensor) -> Tensor:
    """[Q, G] scores and bool truth -> [Q]: rank of each query's best-ranked true item (G when none)."""
    if scores.shape != truth.shape:
        raise ValueError(f"truth {tuple(truth.shape)} must match scores {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: no ranking is defined")
    return _best_true_ranks(scores, lambda lo, hi: truth[lo:hi])


def recall_any_true(scores_i2t: Tensor, truth: Tensor, scores_t2i: Tensor | None = None) -> dict[str, float]:
    """As `recall`, but a query is answered by any gallery item true of it, not only its own:
    truth [images, captions] bool (an image's own captions among them). Image retrieval: a caption
    counts at the rank of its best-ranked image it is true of. With one-hot truth it equals `recall`."""
    scores_t2i = scores_i2t if scores_t2i is None else scores_t2i
    truth = truth.bool()
    return _summary(truth_ranks(scores_i2t, truth), truth_ranks(scores_t2i.T, truth.T))


def fold_average(
    scores_i2t: Tensor, caption_image: Tensor, scores_t2i: Tensor | None = None, folds: int = 5
) -> dict[str, float]:
    """The COCO "1K test": the images cut into `folds` contiguous folds of equal size (5 x 1,000 for
    the 5K test), each fold evaluated on its own images and their captions, recalls averaged.

    The number of images must divide by `folds` (ValueError otherwise: a silent uneven cut would not
    be the published protocol).
    """
    caption_image = caption_image.long()
    scores_t2i = scores_i2t if scores_t2i is None else scores_t2i
    images = scores_i2t.shape[0]
    if folds < 1 or images % folds:
        raise ValueError(f"{images} images do not cut into {folds} equal folds")
    size = images // folds
    totals: dict[str, float] = {}
    for f in range(folds):
        lo, hi = f * size, (f + 1) * size
        columns = ((caption_image >= lo) & (caption_image < hi)).nonzero().flatten()  # this fold's captions
        part = recall(scores_i2t[lo:hi][:, columns], caption_image[columns] - lo, scores_t2i[lo:hi][:, columns])
        for key, value in part.items():
            totals[key] = totals.get(key, 0.0) + value / folds
    return totals
