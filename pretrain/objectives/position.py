"""Position: the relation curriculum as a pretraining term (data_tools/curriculum.py says why).

ITM on position captions, "the red circle is left" (matched) against "the red circle is right" (not
matched), one pair per sample with a labelled box: for the first `single_steps` steps on single-shape
views of the images (the other shapes painted over), then on the full scenes. For the first
`hold_steps` steps this term trains alone (the other terms, IAIS included, wait: a relation is a
product of what these steps build, and mixed in from step 0 the position captions stayed at ln 2 as
well); after that it keeps its weight beside the rest.

Each phase is a plateau at ln 2 that ends abruptly at a step that varies with the seed (and with the
CPU's rounding); a phase that ends before its plateau does leaves the next one to start from an
unlearned factor, and relation sensitivity follows the position loss at the end of the hold
(docs/experiments.md). With `advance_below` > 0 a phase ends when it is learned instead: at the first
logging step where the term's mean loss since the previous logging step, over all ranks, is below
that value (one all-reduce and one host read per logging step); `single_steps` and `hold_steps` then
bound the phases. Where the phases ended is saved in the run state, so a resumed run continues them.

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

from pretrain.transfer import to_device

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
    advance_below: float = 0.0
    """> 0: a phase ends at the first logging step (train.log_every) where this term's mean loss since the
    previous one, over all ranks, is below this value; `single_steps` and `hold_steps` are then the latest
    steps the phases may last. 0: the phases end at those steps. (ln 2 = 0.693 is the untrained loss.)"""
    single_replay: float = 0.0
    """After the single-shape phase, this fraction of each batch's pairs keeps single-shape views (the rest
    are full scenes): what the first phase built keeps its gradient while the full scenes are at chance.
    `advance_below` then reads the full-scene pairs' loss only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("single_steps", "hold_steps"):
            value = getattr(self, name)
            check(name, value, isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an integer >= 0")
        check("advance_below", self.advance_below, 0.0 <= self.advance_below < 0.6931, "a loss in [0, ln 2)")
        check("single_replay", self.single_replay, 0.0 <= self.single_replay < 1.0, "a fraction in [0, 1)")


def position_itm_logits(
    model: Any, encode: Any, batch: dict[str, Any], pairs: Sequence[PositionPair], single: Sequence[PositionPair]
) -> Tensor:
    """ITM logits [2n, 2] of [n images + their true captions; the same images + the opposite side], where
    the images of the pairs in `single` are reduced to the captioned shape. `encode`: a TextEncoder."""
    tokens, mask = model.embed_visual(single_shape_view(batch, single) if single else batch)
    device = tokens.device
    rows = to_device(torch.tensor([pair.row for pair in pairs]), device)
    text = encode([pair.true for pair in pairs] + [pair.false for pair in pairs])
    out = model(
        to_device(text["input_ids"], device),
        to_device(text["text_mask"], device),
        tokens[rows].repeat(2, 1, 1),
        mask[rows].repeat(2, 1),
    )
    return model.itm_logits(out)


def two_way_loss(logits: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ITM logits [2n, 2] whose first n rows are matched, last n not."""
    n = logits.shape[0] // 2
    labels = (torch.arange(2 * n, device=logits.device) < n).long()  # made on the device: no copy
    return F.cross_entropy(wide(logits), labels, reduction=reduction)


@register("position", order=5)
class Position(Term):
    Config = PositionConfig

    PHASES = ("single", "hold")
    """The two phases, in order: single-shape views (ends first), then this term alone on full scenes."""

    def __init__(self, config: PositionConfig):
        super().__init__(config)
        self.encode: Any = None
        self.categories: list[str] = []
        self.ended: dict[str, int | None] = dict.fromkeys(self.PHASES)
        """Step at which each phase ended because it was learned (`advance_below`); None: not yet."""
        self._window: list[Tensor] = []  # this rank's training losses since the last logging step (on the device)

    def _limit(self, phase: str) -> int:
        return self.config.single_steps if phase == "single" else self.config.hold_steps

    def in_phase(self, phase: str, step: int) -> bool:
        """Whether step `step` (0-based: the step being computed) belongs to `phase`."""
        end = self.ended[phase]
        return step < (self._limit(phase) if end is None else min(end, self._limit(phase)))

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
        return self.in_phase("hold", progress.step)

    def observe(self, progress: Progress) -> list[str]:
        """`advance_below`: end the open phase when the window's mean loss over all ranks is below it.
        `progress.step` counts the steps done; the next one computed is the first after the phase."""
        window, self._window = self._window, []
        if not self.config.advance_below:
            return []
        phase = next((p for p in self.PHASES if self.in_phase(p, progress.step)), None)
        if phase is None:
            return []
        from pretrain.distributed import all_reduce_floats

        # every rank reaches this point on the same steps (logging steps; phases agree), so the collective matches
        total, count = all_reduce_floats([torch.stack(window).sum() if window else 0.0, len(window)])
        if count == 0 or total / count >= self.config.advance_below:
            return []
        self.ended[phase] = progress.step
        what = "single-shape phase" if phase == "single" else "position-alone phase (the other terms join)"
        return [
            f"objectives.position: {what} ended at step {progress.step}: mean loss {total / count:.3f} over the "
            f"last {int(count)} micro-batches < advance_below {self.config.advance_below}"
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"ended": dict(self.ended)} if self.config.advance_below else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ended = {phase: state.get("ended", {}).get(phase) for phase in self.PHASES}

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
        if self.in_phase("single", step):
            full, single = [], list(pairs)
        elif self.config.single_replay:  # the same generator: every rank and a resumed run draw the same
            replay = [rng.random() < self.config.single_replay for _ in pairs]
            full = [pair for pair, kept in zip(pairs, replay) if not kept]
            single = [pair for pair, kept in zip(pairs, replay) if kept]
        else:
            full, single = list(pairs), []
        logits = position_itm_logits(ctx.model, self.encode, batch, full + single, single)
        if not full or not single:
            loss = learned = two_way_loss(logits)  # learned: the loss the phase's end is decided on
        else:  # the full-scene pairs come first: a slice, no index tensor to copy to the device
            rows = two_way_loss(logits, reduction="none").view(2, len(pairs))
            loss, learned = rows.mean(), rows[:, : len(full)].mean()
        if self.config.advance_below and ctx.model.training:
            self._window.append(learned.detach())  # read on logging steps only (observe): no sync here
        return loss
