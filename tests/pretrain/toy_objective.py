"""A toy objective term that lives in the tests alone: the plugin seam (`plugins: [this module]`,
then `objectives.toy.*`) must need no edit to the package."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from pretrain.objectives import StepContext, Term, TermConfig, register


@dataclasses.dataclass
class ToyConfig(TermConfig):
    """Pull the mean visual token towards `target` (a loss that really reaches the parameters)."""

    target: float = 0.5


@register("toy", order=60)
class Toy(Term):
    Config = ToyConfig

    def loss(self, ctx: StepContext) -> Tensor:
        tokens, mask = ctx.visual  # [B, M, D], [B, M]
        mean = (tokens * mask[..., None]).sum() / mask.sum().clamp(min=1) / tokens.shape[-1]
        return (mean - self.config.target) ** 2
