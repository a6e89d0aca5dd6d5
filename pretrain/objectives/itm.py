"""ITM: matched / not matched from the joint pass, with in-batch hard negatives (ALBEF): for each
image a caption and for each caption an image, drawn by ITC similarity when ITC ran."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import StepContext, Term, TermConfig, masked_mean, register, wide


@dataclasses.dataclass
class ITMConfig(TermConfig):
    """Image-text matching with hard negatives drawn from the ITC similarities (ALBEF)."""

    hard_negatives: bool = True
    """Sample negatives by ITC similarity (needs objectives.itc); false draws them uniformly among other images."""
    caption_negatives: bool = False
    """Also score each image against its sample's own hard negative caption (the dataset's `negatives`: a
    relation or attribute swap), labelled not matched: the only ITM signal about relations."""


def sample_hard_negatives(similarity: Tensor | None, codes: Tensor,
                          sample_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In-batch hard negatives (ALBEF): for each image a text, for each text an image.

    similarity [B text, B image] (None: uniform). Candidates exclude the same image id and padding;
    drawn with probability softmax(similarity) from the torch RNG (saved in checkpoints, so a resumed
    run draws the same). Returns (neg_text_for_image [B], neg_image_for_text [B], valid [B]) where
    valid is False for a sample without any candidate (its two negative rows weigh zero).
    """
    b = codes.shape[0]
    allowed = (codes[:, None] != codes[None, :]) & sample_mask[:, None] & sample_mask[None, :]  # [B, B]
    sim = torch.zeros(b, b, device=codes.device) if similarity is None else similarity.float()
    has = allowed.any(dim=1)  # [B]

    def draw(scores: Tensor, mask: Tensor) -> Tensor:  # rows: queries -> one candidate each, [B]
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        weights = torch.where(has[:, None], weights, torch.ones_like(weights))
        return torch.multinomial(weights.nan_to_num(1.0), 1).squeeze(1)

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
        similarity = ctx.itc_similarity if self.config.hard_negatives else None
        neg_text, neg_image, has_neg = sample_hard_negatives(similarity, ctx.codes, sample_mask)
        ids = torch.cat([input_ids, input_ids[neg_text], input_ids])  # [3B, Lt]
        tmask = torch.cat([text_mask, text_mask[neg_text], text_mask])
        vis = torch.cat([visual_tokens, visual_tokens, visual_tokens[neg_image]])  # [3B, M, D]
        vmask = torch.cat([visual_mask, visual_mask, visual_mask[neg_image]])
        weights = torch.cat([sample_mask, has_neg, has_neg])  # [3B]
        if self.config.caption_negatives and "neg_input_ids" in batch:  # + [image + its swapped caption]: [4B]
            ids, tmask = torch.cat([ids, batch["neg_input_ids"]]), torch.cat([tmask, batch["neg_text_mask"]])
            vis, vmask = torch.cat([vis, visual_tokens]), torch.cat([vmask, visual_mask])
            weights = torch.cat([weights, batch["has_negative"].to(sample_mask.device) & sample_mask])
        rows = ids.shape[0]
        matched = torch.cat([sample_mask, torch.zeros(rows - b, dtype=torch.bool, device=sample_mask.device)])
        out = ctx.joint(ids, tmask, vis, vmask, matched_rows=matched)
        ctx.matched_hidden = out.hidden[:b]  # the matched pairs' pass (WRA reads it)
        logits = ctx.model.itm_logits(out)  # [rows, 2]
        labels = torch.cat([torch.ones(b), torch.zeros(rows - b)]).long().to(ids.device)
        return masked_mean(F.cross_entropy(wide(logits), labels, reduction="none"), weights)
