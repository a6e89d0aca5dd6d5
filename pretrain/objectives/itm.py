"""ITM: matched / not matched from the joint pass, with in-batch hard negatives (ALBEF): for each
image a caption and for each caption an image, drawn by ITC similarity when ITC ran."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from data_tools.errors import check
from pretrain.model.masks import cat_masks, take_rows

from .base import StepContext, Term, TermConfig, masked_mean, register, sample_categorical, wide


@dataclasses.dataclass
class ITMConfig(TermConfig):
    """Image-text matching with hard negatives drawn from the ITC similarities (ALBEF)."""

    hard_negatives: bool = True
    """Sample negatives by ITC similarity (needs objectives.itc); false draws them uniformly among other images."""
    hard_negatives_after: int = 0
    """Steps of uniform random negatives before `hard_negatives` starts (ALBEF's warm-up on easier negatives). On
    the synthetic scenes ITM went back to its label prior once the hard ones started: `tiny` draws random ones."""
    caption_negatives: bool = False
    """Also score each image against its sample's own hard negative caption (the dataset's `negatives`: a
    relation or attribute swap), labelled not matched: the only ITM signal about relations."""

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.hard_negatives_after
        check(
            "hard_negatives_after",
            value,
            isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            "an integer >= 0",
        )


def sample_hard_negatives(
    similarity: Tensor | None, codes: Tensor, sample_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """In-batch hard negatives (ALBEF): for each image a text, for each text an image.

    similarity [B text, B image] (None: uniform). Candidates exclude the same image id and padding;
    drawn with probability softmax(similarity) from the torch RNG (saved in checkpoints, so a resumed
    run draws the same), on the device (`sample_categorical`). Returns (neg_text_for_image [B],
    neg_image_for_text [B], valid [B]) where valid is False for a sample without any candidate (its
    two negative rows weigh zero).
    """
    b = codes.shape[0]
    allowed = (codes[:, None] != codes[None, :]) & sample_mask[:, None] & sample_mask[None, :]  # [B, B]
    sim = torch.zeros(b, b, device=codes.device) if similarity is None else similarity.float()
    has = allowed.any(dim=1)  # [B]

    def draw(scores: Tensor, mask: Tensor) -> Tensor:  # rows: queries -> one candidate each, [B]
        logits = scores.masked_fill(~mask, float("-inf"))
        return sample_categorical(torch.where(has[:, None], logits, torch.zeros_like(logits)))  # none: any (weight 0)

    neg_image_for_text = draw(sim, allowed)
    neg_text_for_image = draw(sim.T, allowed.T)
    return neg_text_for_image, neg_image_for_text, has


@register("itm", order=20)
class ITM(Term):
    """One joint pass over [positives; image + negative text; negative image + text] ([3B] rows, plus
    [image + its own negative caption] with `caption_negatives`); the first B rows are the matched
    pairs (IAIS blocks are computed for them when wanted)."""

    Config = ITMConfig

    def loss(self, ctx: StepContext) -> Tensor:
        batch, sample_mask = ctx.batch, ctx.sample_mask
        input_ids, text_mask = batch["input_ids"], batch["text_mask"]  # [B, Lt]
        visual_tokens, visual_mask = ctx.visual
        b = input_ids.shape[0]
        hard = self.config.hard_negatives and ctx.progress.step >= self.config.hard_negatives_after
        similarity = ctx.itc_similarity if hard else None
        neg_text, neg_image, has_neg = sample_hard_negatives(similarity, ctx.codes, sample_mask)
        ids = torch.cat([input_ids, input_ids[neg_text], input_ids])  # [3B, Lt]
        tmask = cat_masks([text_mask, take_rows(text_mask, neg_text), text_mask])  # unpadded where the batch is
        vis = torch.cat([visual_tokens, visual_tokens, visual_tokens[neg_image]])  # [3B, M, D]
        vmask = cat_masks([visual_mask, visual_mask, take_rows(visual_mask, neg_image)])
        weights = torch.cat([sample_mask, has_neg, has_neg])  # [3B]
        if self.config.caption_negatives and "neg_input_ids" in batch:  # + [image + its swapped caption]: [4B]
            ids, tmask = torch.cat([ids, batch["neg_input_ids"]]), cat_masks([tmask, batch["neg_text_mask"]])
            vis, vmask = torch.cat([vis, visual_tokens]), cat_masks([vmask, visual_mask])
            weights = torch.cat([weights, batch["has_negative"].to(sample_mask.device) & sample_mask])
        rows = ids.shape[0]
        out = ctx.joint(ids, tmask, vis, vmask, matched_rows=ctx.matched_rows)  # the first B rows
        ctx.matched_hidden = out.hidden[:b]  # the matched pairs' pass (WRA reads it)
        logits = ctx.model.itm_logits(out)  # [rows, 2]
        labels = (torch.arange(rows, device=ids.device) < b).long()  # [rows]: 1 for the first B (matched)
        return masked_mean(F.cross_entropy(wide(logits), labels, reduction="none"), weights)
