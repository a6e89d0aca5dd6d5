"""The IAIS regulariser (Ren et al., ACL 2021) exactly as DESIGN.md 1 states it, vectorised.

From the head-averaged block attentions of the matched pairs (`AttentionBlocks`, computed by the
model's IAIS layers), build a pseudo matrix of one modality's self-attention from the other:

- singular, L: r(i) = argmax_j S_LV[i, j]; P_LL[i, k] = S_VV[r(i), r(k)], rows normalised
  (softmax over the gathered probabilities = the official code, or sum); V symmetric with S_VL, S_LL.
- distributed, L: P_LL = S_LV @ S_VL; V: P_VV = S_VL @ S_LV.

and penalise the symmetric KL `KL(P || S) + KL(S || P)` per pair (kl_div "batchmean" on the real
rows: sum over columns, mean over rows; the logged side is log(x + 1e-6) in distributed mode and
log(x) in singular mode, clamped at 1e-30 only to keep -inf out), averaged over the matched pairs.

Every pair of the batch is handled at once: padded words and visual tokens are masked (padding never
changes the value or the gradients), the argmax is a tensor index (no host round trip), and nothing
calls .item()/.cpu()/.tolist(). The loss is computed in float32 outside autocast (bf16-safe).
The loss itself (both directions, and the mean over valid pairs) is one autograd node with a
closed-form backward (`iais_fused`); the autograd functions below (`pseudo_and_target`,
`symmetric_kl`) state the same quantities plainly and serve plots and ISDa.
Several layers: the loss is the mean over layers, so lambda keeps its meaning; directions `both`
sum L and V.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from typing import Literal

import torch
from torch import Tensor
from torch.profiler import record_function

from data_tools.errors import ConfigError

from .iais_fused import DISTRIBUTED_EPS, LOG_FLOOR, pair_divergence_outputs
from .model.encoder import AttentionBlocks, key_bias
from .profiling import IAIS_LOSS

Mode = Literal["singular", "distributed"]
Direction = Literal["L", "V", "both", "alternate"]
Normalization = Literal["softmax", "sum"]
Schedule = Literal["constant", "linear", "exp", "log"]
MODES, DIRECTIONS = typing.get_args(Mode), typing.get_args(Direction)
NORMALIZATIONS, SCHEDULES = typing.get_args(Normalization), typing.get_args(Schedule)


@dataclasses.dataclass
class IAISConfig:
    """How the relation-alignment regulariser is applied."""

    enabled: bool = True
    """Apply the regulariser (False: zero loss, no attention blocks computed)."""
    mode: Mode = "singular"
    """singular (argmax alignment, the paper's best) | distributed (attention-weighted alignment)."""
    direction: Direction = "both"
    """L (text relations from the image) | V (image relations from the text) | both (sum) |
    alternate (L even steps, V odd)."""
    normalization: Normalization = "softmax"
    """Row normalisation of the singular pseudo matrix: softmax (official code) | sum (divide by row sum)."""
    weight: float = 1.0
    """lambda: the loss weight at the end of the schedule."""
    schedule: Schedule = "exp"
    """Weight ramp s(p), p = step / total_steps: constant | linear | exp (official: exp(5 (p - 1))) |
    log (1 - exp(-5 p))."""
    layers: list[int] = dataclasses.field(default_factory=lambda: [-1])
    """Layers to regularise; negative counts from the end (official: the last, -1). For model.architecture=two_stream
    these index the co-attention blocks (model.cross_layers of them); a dual_encoder has none (IAIS refused)."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("mode", MODES),
            ("direction", DIRECTIONS),
            ("normalization", NORMALIZATIONS),
            ("schedule", SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"iais.{name}", getattr(self, name), " | ".join(allowed))
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight < 0
        ):
            raise ConfigError("iais.weight", self.weight, "a finite number >= 0")
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if (
            not isinstance(self.layers, (list, tuple))
            or not self.layers
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise ConfigError("iais.layers", self.layers, "a non-empty list of layer indices, e.g. [-1]")


@dataclasses.dataclass
class IAISOutput:
    loss: Tensor  # scalar float32: weight * raw
    raw: Tensor  # scalar float32: unweighted (sum over active directions of the mean over layers)
    isd: dict[str, Tensor]  # {"L": scalar, "V": scalar}, detached, both directions always
    weight: float


def schedule_factor(schedule: str, progress: float) -> float:
    """s(p) of DESIGN.md 1 for p in [0, 1]."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return progress
    if schedule == "exp":
        return math.exp(5.0 * (progress - 1.0))
    if schedule == "log":
        return 1.0 - math.exp(-5.0 * progress)
    raise ValueError(f"unknown schedule {schedule!r}")


def _normalise_rows(gathered: Tensor, col_mask: Tensor, normalization: str) -> Tensor:
    # gathered [P, r, r] probabilities, col_mask [P, r]: each row -> a distribution over real columns.
    if normalization == "softmax":
        return (gathered + key_bias(col_mask, gathered.dtype)[:, None, :]).softmax(dim=-1)
    kept = gathered * col_mask[:, None, :]
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(LOG_FLOOR)


def _gather_square(matrix: Tensor, index: Tensor) -> Tensor:
    """matrix [P, s, s], index [P, r] -> out [P, r, r] with out[p, i, k] = matrix[p, index[p, i], index[p, k]]."""
    size = matrix.shape[-1]
    flat = index[:, :, None] * size + index[:, None, :]  # [P, r, r] positions in the flattened s x s
    return matrix.flatten(1).gather(1, flat.flatten(1)).view(flat.shape)


def pseudo_and_target(
    blocks: AttentionBlocks, direction: str, mode: str, normalization: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(pseudo [P, r, r], attention [P, r, r], mask [P, r]) for direction "L" (r = n) or "V" (r = m)."""
    if direction == "L":
        target, mask, other_mask = blocks.s_ll, blocks.word_mask, blocks.visual_mask
        cross, back, other_self = blocks.s_lv, blocks.s_vl, blocks.s_vv
    else:
        target, mask, other_mask = blocks.s_vv, blocks.visual_mask, blocks.word_mask
        cross, back, other_self = blocks.s_vl, blocks.s_lv, blocks.s_ll
    if mode == "distributed":
        return cross @ back, target, mask  # [P, r, s] @ [P, s, r]: row-stochastic over real columns
    # The argmax over real tokens of the other modality; an index, so it carries no gradient.
    aligned = (cross.detach() - 2.0 * (~other_mask[:, None, :])).argmax(dim=-1)  # [P, r], over real tokens
    return _normalise_rows(_gather_square(other_self, aligned), mask, normalization), target, mask


def _symmetric_terms(pseudo: Tensor, attention: Tensor, distributed: bool) -> Tensor:
    """Elementwise `KL(P || S) + KL(S || P)` terms (any shape; entries already masked to 0).

    Singular: the logged side is log(max(x, 1e-30)), the same function as the target side, so the
    two KLs sum to (P - S)(log P - log S). Distributed: the logged side is log(x + 1e-6).
    """
    log_p, log_s = torch.log(pseudo.clamp_min(LOG_FLOOR)), torch.log(attention.clamp_min(LOG_FLOOR))
    if not distributed:
        return (pseudo - attention) * (log_p - log_s)
    return pseudo * (log_p - torch.log(attention + DISTRIBUTED_EPS)) + attention * (
        log_s - torch.log(pseudo + DISTRIBUTED_EPS)
    )


def symmetric_kl(pseudo: Tensor, attention: Tensor, mask: Tensor, distributed: bool) -> Tensor:
    """KL(P || S) + KL(S || P) per pair, each summed over real columns and averaged over real rows.

    pseudo, attention [P, r, r]; mask [P, r] -> [P]. The logged side is `log(x + 1e-6)` (distributed)
    or `log(max(x, 1e-30))` (singular); the target side is exact (`0 log 0 = 0`), as torch's kl_div.
    """
    columns = mask[:, None, :].to(pseudo.dtype)
    return _masked_mean_rows(_symmetric_terms(pseudo * columns, attention * columns, distributed), mask)


def _masked_mean_rows(terms: Tensor, mask: Tensor) -> Tensor:
    # terms [P, r, r] (padded columns already 0), mask [P, r] -> [P]: sum over columns, mean over real rows.
    per_row = terms.sum(dim=-1) * mask  # [P, r]; padded rows dropped (and get no gradient)
    return per_row.sum(dim=-1) / mask.sum(dim=-1).clamp_min(1).to(terms.dtype)


def pair_divergences(
    blocks: AttentionBlocks,
    mode: str = "singular",
    normalization: str = "softmax",
    directions: tuple[str, ...] = ("L", "V"),
) -> tuple[Tensor, Tensor]:
    """Per-pair symmetric KL for several directions: (values [D, P], valid [P] bool).

    Padded columns of the four blocks are zeroed first (a no-op on the model's blocks, whose masked
    softmax already gives exact zeros), so every pseudo matrix and target is 0 there and each KL
    term vanishes; padded rows are dropped after the column sum. A pair is valid when it has at
    least one real word and one real visual token. Float32 (or float64 inputs), outside autocast.
    """
    values, valid = direction_divergences(blocks, mode, normalization)
    return torch.stack([values[direction] for direction in directions]), valid


def direction_divergences(
    blocks: AttentionBlocks, mode: str = "singular", normalization: str = "softmax"
) -> tuple[dict[str, Tensor], Tensor]:
    """({"L": [P], "V": [P]}, valid [P] bool): both directions from one autograd node
    (`iais_fused`); a direction that is only logged (detached) costs no backward."""
    with _float32_region(blocks.s_ll):
        values = pair_divergence_outputs(
            *_float_blocks(blocks), blocks.word_mask, blocks.visual_mask, mode, normalization
        )
    return dict(zip(("L", "V"), values)), blocks.word_mask.any(dim=1) & blocks.visual_mask.any(dim=1)


def direction_means(
    blocks: AttentionBlocks, mode: str = "singular", normalization: str = "softmax"
) -> dict[str, Tensor]:
    """{"L": scalar, "V": scalar}: each direction's mean over the valid pairs (0 when none is), the
    whole reduction inside the one autograd node."""
    with _float32_region(blocks.s_ll):
        values = pair_divergence_outputs(
            *_float_blocks(blocks), blocks.word_mask, blocks.visual_mask, mode, normalization, reduce=True
        )
    return dict(zip(("L", "V"), values))


def _float32_region(like: Tensor):
    # The loss runs in float32 (or float64) outside autocast; entering the guard only when needed.
    device = like.device.type
    return (
        torch.autocast(device_type=device, enabled=False)
        if torch.is_autocast_enabled(device)
        else contextlib.nullcontext()
    )


def _float_blocks(blocks: AttentionBlocks) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = torch.promote_types(blocks.s_ll.dtype, torch.float32)
    return blocks.s_ll.to(dtype), blocks.s_vv.to(dtype), blocks.s_lv.to(dtype), blocks.s_vl.to(dtype)


def pair_divergence(
    blocks: AttentionBlocks, direction: str, mode: str = "singular", normalization: str = "softmax"
) -> tuple[Tensor, Tensor]:
    """Per-pair symmetric KL for one direction: (values [P], valid [P] bool)."""
    values, valid = pair_divergences(blocks, mode, normalization, (direction,))
    return values[0], valid


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """`iais.layers` (negative from the end) -> sorted non-negative indices below `num_layers`
    (`ModelConfig.iais_layer_count`: encoder layers, or a two_stream model's co-attention blocks)."""
    resolved = []
    for index in layers:
        layer = index + num_layers if index < 0 else index
        if not 0 <= layer < num_layers:
            raise ConfigError("iais.layers", layers, f"indices in [-{num_layers}, {num_layers})")
        resolved.append(layer)
    return sorted(set(resolved))


class IAISRegularizer:
    """Callable loss: attention blocks of the regularised layers -> weighted IAIS loss and ISD.

    The one owner of "which layers does IAIS read": `layers` (resolved, non-negative) and
    `attach(model)`, which makes exactly those layers of the model compute attention blocks for the
    rows passed as `iais_rows` to `model.forward`. It exists only when IAIS is on
    (`from_config` returns None for `iais.enabled=false`), so nothing else checks `enabled`.
    """

    def __init__(self, config: IAISConfig, num_layers: int):
        self.config = config
        self.layers: list[int] = resolve_layers(config.layers, num_layers)

    @classmethod
    def from_config(cls, config: IAISConfig, num_layers: int) -> "IAISRegularizer | None":
        return cls(config, num_layers) if config.enabled else None

    def attach(self, model: "torch.nn.Module") -> None:
        """Make the model compute attention blocks at this regulariser's layers."""
        model.set_iais_layers(self.layers)

    def weight(self, step: int, total_steps: int) -> float:
        """lambda * s(step / total_steps), p clamped to [0, 1]."""
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        progress = min(max(step / total_steps, 0.0), 1.0)
        return self.config.weight * schedule_factor(self.config.schedule, progress)

    def active_directions(self, step: int, direction: str | None = None) -> tuple[str, ...]:
        """The directions regularised at `step` (`direction` overrides iais.direction, e.g. the
        finetuning recipe's V on image-built batches)."""
        direction = direction or self.config.direction
        if direction == "both":
            return ("L", "V")
        if direction == "alternate":
            return ("L",) if step % 2 == 0 else ("V",)
        return (direction,)

    def __call__(
        self, attention: dict[int, AttentionBlocks], step: int, total_steps: int, direction: str | None = None
    ) -> IAISOutput:
        missing = [layer for layer in self.layers if layer not in attention]
        if missing:
            raise ValueError(
                f"no IAIS attention blocks for layers {missing}: call regularizer.attach(model) "
                f"and pass iais_rows to model.forward"
            )
        weight = self.weight(step, total_steps)
        active = self.active_directions(step, direction)
        # Both directions in one pass; the inactive one only for logging (detached: no backward).
        with record_function(IAIS_LOSS):
            per_layer = [
                direction_means(attention[layer], self.config.mode, self.config.normalization) for layer in self.layers
            ]
        means = (
            per_layer[0]
            if len(per_layer) == 1
            else {
                direction: torch.stack([values[direction] for values in per_layer]).mean() for direction in ("L", "V")
            }
        )
        raw = means["L"] if active == ("L",) else means["V"] if active == ("V",) else means["L"] + means["V"]
        isd = {"L": means["L"].detach(), "V": means["V"].detach()}
        return IAISOutput(loss=raw * weight, raw=raw, isd=isd, weight=weight)
