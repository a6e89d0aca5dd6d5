"""The IAIS regulariser as a term of a composite objective.

Its configuration is the top-level `iais` section (pretrain.iais.IAISConfig) and its weight is the
regulariser's schedule, lambda x s(step / total_steps). It reads the attention blocks of the matched
pairs that the first joint pass left in the StepContext (ITM's, or the hinge pass's in finetuning);
when no term made a joint pass over the matched pairs, it makes one itself. Logs `loss/iais` (the
unweighted loss), `iais_weight` and `isd/L`, `isd/V`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.iais import IAISRegularizer

from .base import Progress, StepContext, Term


class IAISTerm(Term):
    name = "iais"
    order = 30
    reads_attention = True
    sampled = False  # a regulariser: every step, on whichever pass over the matched pairs there is

    def __init__(self, regularizer: IAISRegularizer):
        super().__init__(regularizer.config)
        self.regularizer = regularizer
        self._output = None

    def weight(self, progress: Progress) -> float:
        return self.regularizer.weight(progress.step, progress.total_steps)

    def loss(self, ctx: StepContext) -> Tensor:
        if ctx.matched_attention is None:
            batch = ctx.batch
            visual_tokens, visual_mask = ctx.visual
            ctx.joint(batch["input_ids"], batch["text_mask"], visual_tokens, visual_mask, matched_rows=ctx.matched_rows)
        progress = ctx.progress
        reg = self.regularizer(ctx.matched_attention, progress.step, progress.total_steps, ctx.iais_direction)
        ctx.logs["iais_weight"] = torch.as_tensor(float(reg.weight))
        for direction, value in reg.isd.items():
            ctx.logs[f"isd/{direction}"] = value.detach().float()
        return reg.raw
