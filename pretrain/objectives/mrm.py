"""MRM: UNITER's masked region modelling on visual tokens, with conditional masking.

A fraction of each sample's real visual tokens (at least one) is zeroed after `embed_visual`, the
text stays unmasked (UNITER: words and regions are never masked at the same time), and one joint
pass predicts, at the masked tokens:

- MRFR (always): the token's input feature, L2 regression (mean squared error per element). The
  input feature is what the visual embedder read for that token: the patch's normalised pixels
  (3 x p x p) for `patch`, the region feature for `features`, the frozen backbone's 1280-channel cell
  for `grid` (recomputed without gradient).
- MRC (`mrc: true`): the category of the box the token belongs to (a cell's centre inside the box,
  the smallest such box; a region with IoU >= 0.5, the best one; pretrain.isd.token_in_box), over the
  datasets' `box_labels` vocabulary. UNITER's MRC matches the detector's soft class distribution
  with KL; the data here carries hard labels, so this is cross-entropy (UNITER's MRC, not MRC-kl).
  Tokens in no labelled box add nothing. Needs data with categories (checked at config time).

The loss is MRFR + MRC; both are logged (`loss/mrfr`, `loss/mrc`) beside `loss/mrm`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_tools.errors import ConfigError, check
from pretrain.isd import token_in_box

from .base import StepContext, Term, TermConfig, register, wide


@dataclasses.dataclass
class MRMConfig(TermConfig):
    """Masked region modelling (UNITER): MRFR regression and, optionally, MRC classification."""

    enabled: bool = False
    mask_probability: float = 0.15
    """Fraction of each sample's real visual tokens zeroed (at least one per sample)."""
    mrc: bool = False
    """Also classify the masked tokens' box categories (needs datasets whose dataset.json lists box_labels)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            "objectives.mrm.mask_probability",
            self.mask_probability,
            0 < self.mask_probability < 1,
            "a number in (0, 1)",
        )


class TokenHead(nn.Module):
    """UNITER's region heads: dense, GELU, LayerNorm, then a projection to `out` values per token."""

    def __init__(self, width: int, out: int, eps: float, std: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.out = nn.Linear(width, out)
        for linear in (self.dense, self.out):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        # hidden [N, W] -> [N, out]
        return self.out(self.norm(F.gelu(self.dense(hidden))))


def input_feature_dim(model_config) -> int:
    """Width of a visual token's input feature for the configured embedder (MRFR's target)."""
    from pretrain.model.config import GRID_BACKBONE_CHANNELS

    return {
        "patch": 3 * model_config.patch_size**2,
        "features": model_config.feature_dim,
        "grid": GRID_BACKBONE_CHANNELS,
    }[model_config.visual_embedder]


def pixels_of(batch: dict) -> Tensor:
    """Normalised pixel_values [B, 3, H, W] (normalising a loader batch's uint8 pixels if needed)."""
    if "pixel_values" in batch:
        return batch["pixel_values"]
    from data_tools.transforms import normalise

    return normalise(batch["pixel_uint8"])


@torch.no_grad()
def token_inputs(model: nn.Module, batch: dict) -> Tensor:
    """Each visual token's input feature [B, M, D], in the embedder's token order (row-major cells)."""
    kind = model.config.visual_embedder
    if kind == "features":
        return batch["visual_feats"].float()
    pixels = pixels_of(batch)
    if kind == "patch":
        p = model.config.patch_size
        return F.unfold(pixels.float(), kernel_size=p, stride=p).transpose(1, 2)  # [B, M, 3 p p], Conv2d's order
    backbone = model.visual.backbone  # grid: the cells the frozen backbone gave the embedder
    fmap = backbone.extract_features(pixels.to(backbone._conv_stem.weight.dtype))  # [B, 1280, rows, cols]
    return fmap.flatten(2).transpose(1, 2).float()


def token_boxes(model: nn.Module, batch: dict, tokens: int) -> Tensor:
    """Each visual token's box [B, M, 4] (x1, y1, x2, y2) in the pixels the batch's `boxes` use."""
    from pretrain.model.visual import cell_boxes

    kind = model.config.visual_embedder
    if kind == "features":
        boxes = batch["visual_pos"][..., :4].float()
        if "image_hw" not in batch:
            return torch.full_like(boxes, -1.0)  # normalised geometry cannot meet pixel boxes: no labels
        height, width = batch["image_hw"].float().unbind(-1)
        return boxes * torch.stack([width, height, width, height], dim=-1)[:, None, :]
    pixels = pixels_of(batch)
    height, width = pixels.shape[-2:]
    if kind == "patch":
        p = model.config.patch_size
        rows, cols, cell_h, cell_w = height // p, width // p, p, p
    else:  # grid: square cells over the whole image
        rows = cols = int(math.isqrt(tokens))
        cell_h, cell_w = height / rows, width / cols
    return cell_boxes(rows, cols, cell_h, cell_w, pixels.device).expand(pixels.shape[0], -1, -1)


def token_categories(model: nn.Module, batch: dict, tokens: int) -> Tensor:
    """Category index of each visual token [B, M] (-1: in no labelled box)."""
    kind = getattr(model.visual, "token_kind", "cell")
    all_boxes = token_boxes(model, batch, tokens)  # [B, M, 4]
    labels = torch.full(all_boxes.shape[:2], -1, dtype=torch.long, device=all_boxes.device)
    for i, (boxes, categories) in enumerate(zip(batch["boxes"], batch["box_categories"])):
        known = categories >= 0
        if not bool(known.any()):
            continue
        boxes, categories = boxes[known].to(all_boxes), categories[known].to(labels.device)  # [k, 4], [k]
        inside = token_in_box(all_boxes[i][None], boxes[None], kind)[0]  # [M, k]
        if kind == "region":
            from pretrain.isd import box_iou

            score = box_iou(all_boxes[i], boxes).masked_fill(~inside, -1.0)  # best IoU wins
        else:
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [k]
            score = (-area)[None].expand_as(inside).masked_fill(~inside, -math.inf)  # smallest box wins
        best = score.argmax(dim=1)  # [M]
        labels[i] = torch.where(inside.any(dim=1), categories[best], labels[i])
    return labels


def mask_visual_tokens(visual_mask: Tensor, sample_mask: Tensor, probability: float) -> Tensor:
    """Tokens to mask [B, M] bool: each real token with `probability`, and at least one per real
    sample (its token with the lowest draw), from the torch RNG (saved in checkpoints)."""
    real = visual_mask.bool() & sample_mask[:, None]  # [B, M]
    draws = torch.rand(real.shape, device=real.device).masked_fill(~real, 2.0)
    lowest = draws == draws.min(dim=1, keepdim=True).values
    return real & ((draws < probability) | lowest)


@register("mrm", order=45)
class MRM(Term):
    Config = MRMConfig

    def build_head(self, model_config, categories: list[str]) -> nn.Module:
        if self.config.mrc and not categories:
            raise ConfigError(
                "objectives.mrm.mrc",
                True,
                "false: no dataset in data.paths lists box_labels (categories) in its dataset.json",
            )
        width, eps, std = model_config.width, model_config.layer_norm_eps, model_config.initializer_range
        heads = nn.ModuleDict({"mrfr": TokenHead(width, input_feature_dim(model_config), eps, std)})
        if self.config.mrc:
            heads["mrc"] = TokenHead(width, len(categories), eps, std)
        return heads

    def loss(self, ctx: StepContext) -> Tensor:
        batch, model = ctx.batch, ctx.model
        visual_tokens, visual_mask = ctx.visual  # [B, M, W], [B, M]
        masked = mask_visual_tokens(visual_mask, ctx.sample_mask, self.config.mask_probability)  # [B, M]
        zeroed = visual_tokens.masked_fill(masked[..., None], 0)
        out = ctx.joint(batch["input_ids"], batch["text_mask"], zeroed, visual_mask)  # text unmasked
        hidden = out.hidden[:, out.text_len :][masked]  # [N, W]
        if hidden.shape[0] == 0:  # only padding slots in this micro-batch
            return out.hidden.sum() * 0.0
        target = token_inputs(model, batch)[masked].to(hidden.device)  # [N, D]
        mrfr = F.mse_loss(wide(self.head["mrfr"](hidden)), target.float())
        ctx.logs["loss/mrfr"] = mrfr.detach()
        if "mrc" not in self.head:
            return mrfr
        labels = token_categories(model, batch, masked.shape[1])[masked]  # [N]
        logits = self.head["mrc"](hidden)  # [N, C]
        if bool((labels >= 0).any()):
            mrc = F.cross_entropy(wide(logits), labels, ignore_index=-1)
        else:
            mrc = logits.sum() * 0.0  # no masked token in a labelled box: keeps the graph connected
        ctx.logs["loss/mrc"] = mrc.detach()
        return mrfr + mrc
