"""MLM: masked words predicted from the joint pass over the matched pairs (words masked by the
loader: `mlm_input_ids`, `mlm_labels`). With `objectives.tags` the text is Oscar's
`[CLS] words [SEP] tags [SEP]`, masked words and tags predicted alike (`ctx.mlm_text()`, extended by the
tags term), and the pass's output stays in `ctx.mlm_output` for the tags' polluted/original head."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor

from data_tools.batch import IGNORE_INDEX

from .base import StepContext, Term, TermConfig, register, wide


@dataclasses.dataclass
class MLMConfig(TermConfig):
    """Masked language modelling on `mlm_input_ids`/`mlm_labels`."""


@register("mlm", order=40)
class MLM(Term):
    Config = MLMConfig

    def loss(self, ctx: StepContext) -> Tensor:
        batch, model = ctx.batch, ctx.model
        visual_tokens, visual_mask = ctx.visual
        input_ids, text_mask, labels = ctx.mlm_text()
        # The loader's flat indices of the targets: their count is known on the host. A text extended on
        # the device (tags), or a hand-built batch, selects them with a boolean mask (a host read).
        positions = batch.get("mlm_positions") if ctx.extend_mlm_text is None else None  # [N] long
        if positions is None:
            labels = labels.masked_fill(~ctx.sample_mask[:, None], IGNORE_INDEX)  # [B, L]
            positions = labels != IGNORE_INDEX  # [B, L] bool
            targets = labels[positions]  # [N]
        else:
            targets = labels.flatten().index_select(0, positions)  # [N]
        out = ctx.joint(input_ids, text_mask, visual_tokens, visual_mask)
        ctx.mlm_output = out
        logits = model.mlm_logits(out, positions)  # [N, V]: only masked positions
        if logits.shape[0]:
            return F.cross_entropy(wide(logits), targets)
        return model.mlm_logits(out).sum() * 0.0  # no masked word in this micro-batch: keeps the graph connected
