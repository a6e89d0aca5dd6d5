"""WRA: UNITER's word-region alignment, an optimal-transport distance between the word outputs and
the visual-token outputs of each matched pair (Chen et al., UNITER, ECCV 2020; their `model/ot.py`).

Cost C[i, j] = 1 - cos(word i, visual token j) over real words (no [CLS], [SEP], padding) and real
visual tokens; the transport plan T comes from the inexact proximal point method (IPOT, Xie et al.
2019) with UNITER's constants (beta 0.5, 50 iterations, 1 inner Sinkhorn step), computed under
no_grad; the loss is the transport cost sum(T * C) (UNITER's `trace(C @ T)`), averaged over the
matched pairs. Gradients flow through C only, as in UNITER. Runs in float32 at least (UNITER: "run
in fp32 for stability").
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from data_tools.errors import check
from pretrain.model.model import word_mask_from_text_mask

from .base import StepContext, Term, TermConfig, masked_mean, register, wide


@dataclasses.dataclass
class WRAConfig(TermConfig):
    """Word-region alignment by optimal transport (UNITER's IPOT)."""

    enabled: bool = False
    beta: float = 0.5
    """IPOT's proximal step size (UNITER: 0.5)."""
    iterations: int = 50
    """IPOT outer iterations (UNITER: 50)."""
    inner_steps: int = 1
    """Sinkhorn steps per outer iteration (UNITER's k: 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check("objectives.wra.beta", self.beta, self.beta > 0, "a number > 0")
        check("objectives.wra.iterations", self.iterations, self.iterations >= 1, "an integer >= 1")
        check("objectives.wra.inner_steps", self.inner_steps, self.inner_steps >= 1, "an integer >= 1")


def cosine_cost(words: Tensor, regions: Tensor) -> Tensor:
    """1 - cosine similarity: [P, n, W], [P, m, W] -> [P, n, m] (UNITER's eps 1e-5 in the norms)."""
    return 1 - F.normalize(words, dim=-1, eps=1e-5) @ F.normalize(regions, dim=-1, eps=1e-5).transpose(1, 2)


@torch.no_grad()
def ipot_transport(
    cost: Tensor, word_mask: Tensor, region_mask: Tensor, beta: float = 0.5, iterations: int = 50, inner_steps: int = 1
) -> Tensor:
    """IPOT's transport plan [P, n, m] for costs [P, n, m], UNITER's `ipot` with its padding rules.

    word_mask [P, n], region_mask [P, m] bool (every row has at least one of each). Uniform marginals
    1/n' and 1/m' over the real entries; padded rows and columns of the plan are zero.
    """
    p, n, m = cost.shape
    joint = word_mask[:, :, None] & region_mask[:, None, :]  # [P, n, m]
    n_real = word_mask.sum(dim=1).to(cost.dtype)[:, None]  # [P, 1]
    m_real = region_mask.sum(dim=1).to(cost.dtype)[:, None]  # [P, 1]
    word_pad = (~word_mask).to(cost.dtype) * 1e4  # [P, n]: keeps padded entries of sigma at ~0
    region_pad = (~region_mask).to(cost.dtype) * 1e4  # [P, m]
    sigma = torch.where(word_mask, 1 / n_real, torch.zeros_like(word_pad))  # [P, n]
    plan = joint.to(cost.dtype)  # [P, n, m]
    kernel = torch.exp(-cost / beta) * plan  # [P, n, m]
    for _ in range(iterations):
        q = kernel * plan  # [P, n, m]
        for _ in range(inner_steps):
            delta = 1 / (m_real * (q.transpose(1, 2) @ sigma[..., None]).squeeze(-1) + region_pad)  # [P, m]
            sigma = 1 / (n_real * (q @ delta[..., None]).squeeze(-1) + word_pad)  # [P, n]
        plan = sigma[:, :, None] * q * delta[:, None, :]
    return plan * joint


def wra_distance(
    words: Tensor,
    regions: Tensor,
    word_mask: Tensor,
    region_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_steps: int = 1,
) -> Tensor:
    """Transport cost per pair [P]: sum(T * C) with T from IPOT (no gradient) and C the cosine cost.

    words [P, n, W], regions [P, m, W]; masks [P, n], [P, m] bool (at least one real entry each)."""
    cost = cosine_cost(wide(words), wide(regions))  # [P, n, m]
    joint = word_mask[:, :, None] & region_mask[:, None, :]
    cost = cost.masked_fill(~joint, 0)
    plan = ipot_transport(cost.detach(), word_mask, region_mask, beta, iterations, inner_steps)
    return (cost * plan).sum(dim=(1, 2))


@register("wra", order=25)
class WRA(Term):
    """Reads the matched pairs' pass that ITM left (`ctx.matched_hidden`); without ITM it makes that
    pass itself (and leaves the IAIS blocks for the IAIS term)."""

    Config = WRAConfig

    def loss(self, ctx: StepContext) -> Tensor:
        batch, cfg = ctx.batch, self.config
        input_ids, text_mask = batch["input_ids"], batch["text_mask"]  # [B, Lt]
        visual_tokens, visual_mask = ctx.visual
        if ctx.matched_hidden is None:
            out = ctx.joint(input_ids, text_mask, visual_tokens, visual_mask, matched_rows=ctx.matched_rows)
            ctx.matched_hidden = out.hidden
        hidden = ctx.matched_hidden  # [B, Lt + M, W]
        text_len = input_ids.shape[1]
        words = word_mask_from_text_mask(text_mask.bool())  # [B, Lt]
        regions = visual_mask.bool()  # [B, M]
        # Only pairs with words and visual tokens count. The others (padding slots) get one stand-in word
        # and region so that IPOT stays finite (a NaN plan would reach the gradient even when the row is
        # selected away), and are left out of the mean: all rows in one batched pass, no host sync.
        valid = ctx.sample_mask & words.any(dim=1) & regions.any(dim=1)  # [B]
        words = torch.where(valid[:, None], words, _first_only(words))
        regions = torch.where(valid[:, None], regions, _first_only(regions))
        distance = wra_distance(
            hidden[:, :text_len], hidden[:, text_len:], words, regions, cfg.beta, cfg.iterations, cfg.inner_steps
        )  # [B]
        return masked_mean(distance, valid)


def _first_only(mask: Tensor) -> Tensor:
    """[B, L] bool with only position 0 set: a finite stand-in for a row with nothing to align."""
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return first
