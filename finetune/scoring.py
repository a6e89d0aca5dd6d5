"""Retrieval score matrices [images, captions] of a model over an evaluation gallery.

Modes (DESIGN.md 3):
- `embedding`: cosine of the ITC embeddings (`encode_image`, `encode_text`) of every pair.
- `full`: the ITM score of every (image, caption) pair: one joint forward per pair.
- `rerank`: per query, the top-k gallery items by embedding (ties by gallery order) get their ITM
  score and rank first, ordered by it (ties by gallery order); the rest follow in embedding order.
  Text and image retrieval choose their own candidates, so rerank yields one matrix per direction,
  holding ordinal scores (gallery size - rank) that reproduce exactly that order.

ITM score: `logit` (log-odds of "matched", logits[:, 1] - logits[:, 0]; the default: no ties from a
saturated probability) or `prob` (softmax p(matched)).

Pair scoring (`PairScorer`) is what costs: pairs are cut into batches of exactly `batch_size` rows
(the last one padded by repeating a pair), so every forward has one shape and a pair's score does
not depend on which other pairs share its batch, up to float rounding: a CPU matrix product may sum
a row differently by its position in the batch (1.2e-7 on scores of 1.6, seen on an AVX-512 Xeon;
bit for bit on another). Under torch.distributed (initialised by the
caller, e.g. gloo under torchrun) rank r scores a contiguous range of those batches and the scores
are all-gathered in rank order: the result equals one process's, bit for bit. Every rank encodes
the gallery itself (one forward per image and per caption, cheap beside I x C pairs).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import torch
from torch import Tensor

from data_tools.collate import TextEncoder
from pretrain.distributed import gather_uneven, world_info

from .eval_data import EvalSet, collate_samples

MODES = ("full", "rerank", "embedding")
SCORES = ("logit", "prob")


def unwrap(model: Any) -> Any:
    """The RelAlignModel inside a DeepSpeed engine (`.module`) and the trainer's wrapper (`.model`)."""
    while hasattr(model, "module"):
        model = model.module
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) and hasattr(inner, "itm_logits") else model


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def rank_and_world() -> tuple[int, int]:
    return world_info()


@dataclasses.dataclass
class Texts:
    """Tokenised captions, padded to the longest real one of the set (one shape for every batch)."""

    input_ids: Tensor  # [C, Lt] long
    text_mask: Tensor  # [C, Lt] bool

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def tokenize(texts: list[str], tokenizer, max_text_len: int) -> Texts:
    """Captions -> [C, Lt] with Lt = the longest tokenised caption (at most max_text_len)."""
    encoded = TextEncoder(tokenizer, max_text_len)(texts)
    length = max(3, int(encoded["text_mask"].sum(dim=1).max())) if texts else 3
    return Texts(encoded["input_ids"][:, :length].contiguous(), encoded["text_mask"][:, :length].contiguous())


@dataclasses.dataclass
class Visual:
    """Embedded visual tokens of every image, padded to the most tokens of the set."""

    tokens: Tensor  # [I, M, W]
    mask: Tensor  # [I, M] bool


@torch.no_grad()
def embed_images(
    model, images: list[dict[str, Any]], tokenizer, *, visual: str, image_size: int, batch_size: int
) -> Visual:
    """Visual tokens (model.embed_visual, eval mode) of each image sample, in order."""
    device = model_device(model)
    tokens, masks = [], []
    for lo in range(0, len(images), batch_size):
        batch = to_device(collate_samples(images[lo : lo + batch_size], tokenizer, 3, visual, image_size), device)
        t, m = model.embed_visual(batch)  # [b, M_b, W], [b, M_b]
        tokens.append(t)
        masks.append(m.bool())
    width = max(t.shape[1] for t in tokens)
    tokens = [torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in tokens]
    masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]
    return Visual(torch.cat(tokens), torch.cat(masks))


@torch.no_grad()
def image_embeddings(model, visual: Visual, batch_size: int) -> Tensor:
    """[I, E] L2-normalised ITC embeddings."""
    return torch.cat(
        [
            model.encode_image(visual.tokens[lo : lo + batch_size], visual.mask[lo : lo + batch_size])
            for lo in range(0, visual.tokens.shape[0], batch_size)
        ]
    ).float()


@torch.no_grad()
def text_embeddings(model, texts: Texts, batch_size: int) -> Tensor:
    """[C, E] L2-normalised ITC embeddings."""
    device = model_device(model)
    return torch.cat(
        [
            model.encode_text(
                texts.input_ids[lo : lo + batch_size].to(device), texts.text_mask[lo : lo + batch_size].to(device)
            )
            for lo in range(0, texts.input_ids.shape[0], batch_size)
        ]
    ).float()


class PairScorer:
    """ITM scores of (image, text) index pairs, batched, split across ranks, counted and timed."""

    def __init__(
        self,
        model,
        visual: Visual,
        texts: Texts,
        *,
        batch_size: int = 128,
        score: str = "logit",
        progress: bool = False,
    ):
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.model, self.visual, self.texts = model, visual, texts
        self.batch_size, self.score, self.progress = batch_size, score, progress
        self.pair_forwards = 0
        """Real pairs scored by all ranks together (padding rows not counted)."""
        self.seconds = 0.0

    @torch.no_grad()
    def _score_batch(self, images: Tensor, texts: Tensor) -> Tensor:
        device = model_device(self.model)
        out = self.model(
            self.texts.input_ids[texts].to(device),
            self.texts.text_mask[texts].to(device),
            self.visual.tokens[images],
            self.visual.mask[images],
        )
        logits = self.model.itm_logits(out).float()  # [B, 2]
        if self.score == "prob":
            return logits.softmax(dim=-1)[:, 1]
        return logits[:, 1] - logits[:, 0]

    def __call__(self, images: Tensor, texts: Tensor) -> Tensor:
        """images, texts [P] long -> scores [P] float32 (CPU), identical on every rank."""
        start = time.perf_counter()
        pairs = int(images.shape[0])
        if pairs == 0:
            return torch.zeros(0)
        b = self.batch_size
        batches = math.ceil(pairs / b)
        rank, world = rank_and_world()
        lo, hi = rank * batches // world, (rank + 1) * batches // world  # this rank's batches
        device = self.visual.tokens.device
        padded = batches * b
        fill = torch.arange(padded) % pairs  # padding repeats pairs: every batch is exactly b rows
        images, texts = images[fill].to(device), texts[fill]
        mine = torch.zeros((hi - lo) * b, dtype=torch.float32, device=device)
        bar = None
        if self.progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(
                total=min(hi * b, pairs) - lo * b,
                unit="pair",
                unit_scale=True,
                desc="ITM pairs",
                file=sys.stderr,
                mininterval=1.0,
            )
        for n, index in enumerate(range(lo, hi)):
            rows = slice(index * b, (index + 1) * b)
            mine[n * b : (n + 1) * b] = self._score_batch(images[rows], texts[rows])
            if bar is not None:
                bar.update(max(0, min(b, pairs - index * b)))
        if bar is not None:
            bar.close()
        scores = gather_uneven(mine)  # [batches * b], every rank's slice in rank order
        self.pair_forwards += pairs
        self.seconds += time.perf_counter() - start
        return scores[:pairs].cpu()


def full_scores(scorer: PairScorer, images: int, captions: int) -> Tensor:
    """ITM score of every pair -> [images, captions] (row-major pair order)."""
    flat = torch.arange(images * captions)
    return scorer(flat // captions, flat % captions).view(images, captions)


def top_candidates(scores: Tensor, k: int) -> Tensor:
    """[Q, G] -> [Q, min(k, G)] gallery indices of the k best, ties by gallery order."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : min(k, scores.shape[1])]


def rerank_rows(itm: Tensor, embedding: Tensor, candidates: Tensor) -> Tensor:
    """Ordinal scores [Q, G] (float32, G - rank): candidates first by ITM, then the rest by embedding.

    Two stable sorts: by the item's own key (ITM for candidates, embedding otherwise; gallery order
    among equals), then by candidate-or-not; a stable sort keeps each group's order from the first.
    """
    q, g = embedding.shape
    chosen = torch.zeros(q, g, dtype=torch.bool).scatter_(1, candidates, True)  # [Q, G]
    key = torch.where(chosen, itm, embedding)
    first = torch.sort(key, dim=1, descending=True, stable=True).indices  # [Q, G]
    second = torch.sort(chosen.gather(1, first).to(torch.int8), dim=1, descending=True, stable=True).indices
    order = first.gather(1, second)  # gallery index at each rank
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(g).expand(q, g).contiguous())
    return (g - ranks).to(torch.float32)


def rerank_scores(scorer: PairScorer, embedding: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(scores_i2t, scores_t2i), both [images, captions], from ITM on the union of both directions' top-k."""
    images, captions = embedding.shape
    text_candidates = top_candidates(embedding, k)  # [I, k] captions per image
    image_candidates = top_candidates(embedding.T, k)  # [C, k] images per caption
    flat = torch.cat(
        [
            (torch.arange(images)[:, None] * captions + text_candidates).flatten(),
            (image_candidates * captions + torch.arange(captions)[:, None]).flatten(),
        ]
    ).unique()  # sorted
    itm = torch.full((images * captions,), float("nan"))
    itm[flat] = scorer(flat // captions, flat % captions)
    itm = itm.view(images, captions)
    scores_i2t = rerank_rows(itm, embedding, text_candidates)
    scores_t2i = rerank_rows(itm.T.contiguous(), embedding.T.contiguous(), image_candidates).T.contiguous()
    return scores_i2t, scores_t2i


@dataclasses.dataclass
class GalleryScores:
    mode: str
    scores_i2t: Tensor  # [I, C]
    scores_t2i: Tensor  # [I, C]
    embedding: Tensor  # [I, C] cosine similarities (every mode computes them: cheap)
    pair_forwards: int
    pair_seconds: float
    seconds: float


@torch.no_grad()
def score_gallery(
    model,
    eval_set: EvalSet,
    tokenizer,
    *,
    mode: str = "full",
    k: int = 16,
    batch_size: int = 128,
    max_text_len: int,
    visual: str,
    image_size: int,
    score: str = "logit",
    progress: bool = False,
) -> GalleryScores:
    """Score matrices of `mode` over the gallery of `eval_set` (the model must be in eval mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    start = time.perf_counter()
    vis = embed_images(model, eval_set.images, tokenizer, visual=visual, image_size=image_size, batch_size=batch_size)
    texts = tokenize(eval_set.captions, tokenizer, max_text_len)
    embedding = image_embeddings(model, vis, batch_size).cpu() @ text_embeddings(model, texts, batch_size).cpu().T
    scorer = PairScorer(model, vis, texts, batch_size=batch_size, score=score, progress=progress)
    if mode == "embedding":
        scores_i2t = scores_t2i = embedding
    elif mode == "full":
        scores_i2t = scores_t2i = full_scores(scorer, len(eval_set.images), len(eval_set.captions))
    else:
        scores_i2t, scores_t2i = rerank_scores(scorer, embedding, k)
    return GalleryScores(
        mode, scores_i2t, scores_t2i, embedding, scorer.pair_forwards, scorer.seconds, time.perf_counter() - start
    )
