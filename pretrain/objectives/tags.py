"""Oscar's object tags (Li et al., Oscar, ECCV 2020): the text becomes `[CLS] words [SEP] tags [SEP]`,
the tags being the category names of the sample's boxes (the batch's `tag_ids`, from the json's
`box_labels`), and a contrastive loss: with probability `pollute_probability` a sample's tag
sequence is replaced by another sample's, and a binary head on [CLS] tells polluted from original.

Where the tags go: this term's `prepare` (before any term runs) registers how to extend the text;
`ctx.mlm_text()` builds it on first use (so the pollution's random draws come after ITM's), and the
MLM term masks and predicts words and tags alike (Oscar's masked token
loss, on the loader's `tag_mlm_ids`); the tags head then reads [CLS] of that same pass (Oscar computes
both losses from one pass). Without MLM, this term makes the pass itself. The batch's own
`input_ids`, `text_mask` and `word_mask` stay words-only, so ITC, ITM and IAIS (whose S_LL rows are
words only) never see tags. A tag sequence equal to the original (no boxes, or the same tags) is
labelled original whatever was drawn. The tags are appended behind the words' [SEP] and packed
(padding moved to the end); the combined length data.max_text_len + data.max_tag_len - 1 must fit
model.max_text_len (checked at config time).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_tools.errors import UserError, check

from .base import StepContext, Term, TermConfig, masked_mean, register, sample_categorical, wide


@dataclasses.dataclass
class TagsConfig(TermConfig):
    """Oscar's object tags: tags appended to the text for MLM, and the polluted-tags contrastive loss."""

    enabled: bool = False
    pollute_probability: float = 0.5
    """Probability that a sample's tags are replaced by another sample's (Oscar: 0.5)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            "objectives.tags.pollute_probability",
            self.pollute_probability,
            0 <= self.pollute_probability <= 1,
            "a number in [0, 1]",
        )


class PollutedHead(nn.Module):
    """Polluted / original from the pooled [CLS] (BERT pooler: dense + tanh, then 2 logits)."""

    def __init__(self, width: int, std: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.classifier = nn.Linear(width, 2)
        for linear in (self.dense, self.classifier):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        # hidden [B, L, W] -> [B, 2]
        return self.classifier(torch.tanh(self.dense(hidden[:, 0])))


def pollute(tag_ids: Tensor, sample_mask: Tensor, probability: float) -> tuple[Tensor, Tensor]:
    """For each row, the row whose tags it gets [B] and whether those differ from its own [B] bool.

    With `probability` a real row takes the tags of another real row drawn uniformly (torch RNG, saved
    in checkpoints; on the device, `sample_categorical`); a row without another real row keeps its own."""
    b = tag_ids.shape[0]
    rows = torch.arange(b, device=tag_ids.device)
    others = sample_mask[None, :] & sample_mask[:, None] & (rows[None, :] != rows[:, None])  # [B, B]
    has_other = others.any(dim=1)
    logits = torch.zeros(b, b, device=tag_ids.device).masked_fill(has_other[:, None] & ~others, float("-inf"))
    drawn = sample_categorical(logits)  # [B], uniform over the others (over all rows where there is none)
    swap = (torch.rand(b, device=tag_ids.device) < probability) & has_other & sample_mask
    source = torch.where(swap, drawn, rows)
    polluted = (tag_ids[source] != tag_ids).any(dim=1)  # [B]: equal tags are not polluted
    return source, polluted


def append_tags(
    ids: Tensor, mask: Tensor, labels: Tensor, tag_ids: Tensor, tag_mask: Tensor, tag_labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`[CLS] words [SEP] pad` + `[CLS] tags [SEP] pad` -> `[CLS] words [SEP] tags [SEP] pad`.

    ids, mask, labels [B, Lt]; tag_* [B, Lg] -> [B, Lt + Lg - 1] each (the tags' [CLS] dropped, real
    tokens packed to the front in order)."""
    ids = torch.cat([ids, tag_ids[:, 1:]], dim=1)  # [B, Lt + Lg - 1]
    mask = torch.cat([mask.bool(), tag_mask[:, 1:].bool()], dim=1)
    labels = torch.cat([labels, tag_labels[:, 1:]], dim=1)
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
    return ids.gather(1, order), mask.gather(1, order), labels.gather(1, order)


@register("tags", order=50)
class Tags(Term):
    Config = TagsConfig

    def build_head(self, model_config, categories: list[str]) -> nn.Module:
        return PollutedHead(model_config.width, model_config.initializer_range)

    def prepare(self, ctx: StepContext) -> None:
        if "tag_ids" not in ctx.batch:
            raise UserError("objectives.tags: the batches carry no tag_ids; set data.max_tag_len > 0")
        ctx.extend_mlm_text = self.extend

    def extend(self, ctx: StepContext, text: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The MLM text with (possibly polluted) tags appended; leaves `ctx.tags_polluted`."""
        batch = ctx.batch
        source, ctx.tags_polluted = pollute(batch["tag_ids"], ctx.sample_mask, self.config.pollute_probability)
        return append_tags(
            *text, batch["tag_mlm_ids"][source], batch["tag_mask"][source], batch["tag_mlm_labels"][source]
        )

    def loss(self, ctx: StepContext) -> Tensor:
        out = ctx.mlm_output
        if out is None:  # MLM not computed this step: the same pass, made here
            visual_tokens, visual_mask = ctx.visual
            ids, mask, _ = ctx.mlm_text()
            out = ctx.mlm_output = ctx.joint(ids, mask, visual_tokens, visual_mask)
        logits = self.head(out.hidden)  # [B, 2]
        labels = ctx.tags_polluted.long()  # 1: polluted
        return masked_mean(F.cross_entropy(wide(logits), labels, reduction="none"), ctx.sample_mask)
