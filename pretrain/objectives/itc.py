"""ITC: symmetric InfoNCE of unimodal text and image embeddings, keys gathered from every rank
(OpenCLIP's local loss), `image_id`-aware (another caption of the same image is not a negative)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.distributed import gather_no_grad, gather_with_grad, world_info

from .base import StepContext, Term, TermConfig, masked_mean, register, wide


@dataclasses.dataclass
class ITCConfig(TermConfig):
    """Image-text contrastive loss (symmetric InfoNCE over features gathered from every rank)."""

    learn_temperature: bool = True
    """Learn the temperature, CLIP-style: `logit_scale` starts at log(1 / model.itc_temperature) (0.07) and
    exp(logit_scale) is clamped to model.itc_max_scale (100); false: it stays at model.itc_temperature."""


def itc_loss(
    text_emb: Tensor, image_emb: Tensor, scale: Tensor, codes: Tensor, sample_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE of local queries against keys gathered from every rank (local-loss style).

    text_emb, image_emb [B, E] L2-normalised; scale: the temperature's inverse (exp(logit_scale));
    codes [B] image-id codes; sample_mask [B] bool.
    A key with the same image id as the query (another caption of the same image) is not a negative;
    padding keys are masked out, padding queries weigh zero. Returns (loss, local similarity [B, B]
    detached, text x image, scaled by the temperature as ALBEF samples from, for hard negatives).
    """
    rank, _ = world_info()
    b = text_emb.shape[0]
    all_text = gather_with_grad(text_emb)  # [W*B, E]
    all_image = gather_with_grad(image_emb)  # [W*B, E]
    all_codes = gather_no_grad(codes)  # [W*B]
    all_valid = gather_no_grad(sample_mask)  # [W*B]
    targets = torch.arange(b, device=codes.device) + rank * b  # [B]
    # A key is excluded when it is padding or shares the query's image without being its own pair.
    same_image = codes[:, None] == all_codes[None, :]  # [B, W*B]
    own = torch.zeros_like(same_image)
    own[torch.arange(b, device=codes.device), targets] = True
    excluded = (same_image & ~own) | ~all_valid[None, :]
    t2i = scale * text_emb @ all_image.T  # [B, W*B]
    i2t = scale * image_emb @ all_text.T  # [B, W*B]
    neg_inf = torch.finfo(t2i.dtype).min
    t2i = t2i.masked_fill(excluded, neg_inf)
    i2t = i2t.masked_fill(excluded, neg_inf)
    per_sample = (
        F.cross_entropy(wide(t2i), targets, reduction="none") + F.cross_entropy(wide(i2t), targets, reduction="none")
    ) / 2  # [B]
    local_sim = (scale * text_emb @ image_emb.T).detach()  # [B text, B image], temperature-scaled
    return masked_mean(per_sample, sample_mask), local_sim


@register("itc", order=10)
class ITC(Term):
    Config = ITCConfig

    def loss(self, ctx: StepContext) -> Tensor:
        model, batch = ctx.model, ctx.batch
        visual_tokens, visual_mask = ctx.visual
        text_emb = model.encode_text(batch["input_ids"], batch["text_mask"])  # [B, E]
        image_emb = model.encode_image(visual_tokens, visual_mask)  # [B, E]
        scale = model.itc_scale()  # [1]
        if not self.config.learn_temperature:
            scale = scale.detach()  # no gradient: Adam leaves the (undecayed) logit_scale where it is
        loss, ctx.itc_similarity = itc_loss(text_emb, image_emb, scale, ctx.codes, ctx.sample_mask)
        return loss
