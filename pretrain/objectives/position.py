"""Position: the relation curriculum as a pretraining term (data_tools/curriculum.py says why).

ITM on position captions, "the red circle is left" (matched) against "the red circle is right" (not
matched), one pair per sample with a labelled box: for the first `single_steps` steps on single-shape
views of the images (the other shapes painted over), then on the full scenes. For the first
`hold_steps` steps this term trains alone (the other terms, IAIS included, wait: a relation is a
product of what these steps build, and mixed in from step 0 the position captions stayed at ln 2 as
well); after that it keeps its weight beside the rest.

Needs datasets whose boxes carry labels "<colour> <shape>" (the synthetic scenes' `box_labels`) and
pixel batches. The captions are tokenised with the run's tokenizer (`bind_text`), whose vocabulary
holds the scenes' grammar words. The box and axis of each sample are drawn from a generator seeded by
(step, the batch's keys): every rank and a resumed run draw the same.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from data_tools.curriculum import PositionPair, position_pairs, single_shape_view
from data_tools.errors import ConfigError, check

from .base import Progress, StepContext, Term, TermConfig, register, wide

CAPTION_TOKENS = 12
"""Token length of a position caption: [CLS] the <colour> <shape> is <side> [SEP] fits with room."""


@dataclasses.dataclass
class PositionConfig(TermConfig):
    """ITM on captions naming the canvas half a shape lies in (the relation curriculum; synthetic scenes)."""

    enabled: bool = False
    """Off by default: it needs datasets with box labels (the synthetic scenes)."""
    single_steps: int = 1500
    """Steps on single-shape views (each image keeps the shape its caption names) before full scenes."""
    hold_steps: int = 3000
    """Steps during which this term trains alone (0: mixed in from the start)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("single_steps", "hold_steps"):
            value = getattr(self, name)
            check(name, value, isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an integer >= 0")


def position_itm_logits(
    model: Any, encode: Any, batch: dict[str, Any], pairs: Sequence[PositionPair], single_shape: bool
) -> Tensor:
    """ITM logits [2n, 2] of [n images + their true captions; the same images + the opposite side]
    (`single_shape`: the images reduced to the captioned shape). `encode`: a TextEncoder."""
    tokens, mask = model.embed_visual(single_shape_view(batch, pairs) if single_shape else batch)
    device = tokens.device
    rows = torch.tensor([pair.row for pair in pairs], device=device)
    text = encode([pair.true for pair in pairs] + [pair.false for pair in pairs])
    out = model(
        text["input_ids"].to(device),
        text["text_mask"].to(device),
        tokens[rows].repeat(2, 1, 1),
        mask[rows].repeat(2, 1),
    )
    return model.itm_logits(out)


def two_way_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of ITM logits [2n, 2] whose first n rows are matched, last n not."""
    n = logits.shape[0] // 2
    labels = torch.cat([torch.ones(n), torch.zeros(n)]).long().to(logits.device)
    return F.cross_entropy(wide(logits), labels)


@register("position", order=5)
class Position(Term):
    Config = PositionConfig

    def __init__(self, config: PositionConfig):
        super().__init__(config)
        self.encode: Any = None
        self.categories: list[str] = []

    def bind_text(self, tokenizer: Any, categories: list[str]) -> None:
        from data_tools.collate import TextEncoder

        if not categories:
            raise ConfigError(
                "objectives.position.enabled",
                True,
                "datasets with box labels (dataset.json box_labels: the synthetic scenes)",
            )
        self.encode, self.categories = TextEncoder(tokenizer, CAPTION_TOKENS), list(categories)

    def holds_others(self, progress: Progress) -> bool:
        return progress.step < self.config.hold_steps

    def loss(self, ctx: StepContext) -> Tensor:
        if self.encode is None:
            raise RuntimeError("objectives.position: bind_text(tokenizer, categories) was not called")
        batch, step = ctx.batch, ctx.progress.step
        pixels = batch.get("pixel_values", batch.get("pixel_uint8"))  # [B, 3, S, S] or [B, S, S, 3]
        if pixels is None:
            raise ConfigError("objectives.position.enabled", True, "pixel batches (data.visual=pixels)")
        rng = random.Random(f"position:{step}:{','.join(batch['key'])}")
        pairs = position_pairs(batch, self.categories, pixels.shape[-2], rng)  # the side S, from the shape: no sync
        if not pairs:  # e.g. a batch of padding slots: a zero that keeps the graph (every rank runs backward)
            return sum(p.sum() for p in ctx.model.itm.parameters()) * 0.0
        logits = position_itm_logits(ctx.model, self.encode, batch, pairs, step < self.config.single_steps)
        return two_way_loss(logits)
