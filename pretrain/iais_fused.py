"""The IAIS per-pair divergences, both directions, as one autograd node with a hand-written backward.

Why: at the sizes IAIS runs at (tens of pairs, tens of words and visual tokens) the loss is about
a hundred thousand numbers, so its cost on a CPU (and its launch count on a GPU) is the number of
operations, not their arithmetic. Left to autograd, the loss records about sixty nodes (every
clamp, log, mask and reduction, each with its own backward kernels and temporaries). Here the
forward runs without recording, keeps the few tensors the gradient needs, and the backward is the
closed-form derivative of DESIGN.md 1 (the same clamps and masks as `tests/pretrain/iais_reference.py`).
Both directions live in one flat buffer (`_Layout`: the L matrices [P, n, n], then the V ones
[P, m, m]), so every elementwise step (the logs above all) is one kernel for both, and the two logs
of a KL pair become one log of a ratio.

Vocabulary (direction L; V swaps words and visual tokens): `target` s = S_LL with padded columns
zeroed, `pseudo` p = P_LL, `t` the elementwise symmetric-KL term; a pair's value = the sum over
real rows i of (sum_k t[i, k]) / (real rows). With `floor` = LOG_FLOOR and `[.]` an indicator:

- singular: t = (p - s)(log max(p, floor) - log max(s, floor)), so
  dt/dp = (log p - log s) + (p - s)/p [p >= floor];  dt/ds = -(log p - log s) - (p - s)/s [s >= floor].
  p = softmax(G + column bias) or (G masked) / row sum, G[i, k] = other[a(i), a(k)] (a = argmax,
  no gradient), so dG is the softmax (or sum) backward and d other = scatter-add of dG at a(i), a(k).
- distributed: t = p (log max(p, floor) - log(s + eps)) + s (log max(s, floor) - log(p + eps)), so
  dt/dp = log max(p, floor) + [p >= floor] - log(s + eps) - s / (p + eps) and symmetrically for s;
  P_LL = A @ B and P_VV = B @ A with A = S_LV, B = S_VL (padded columns zeroed).

Each direction is its own output: a direction whose value is only logged (detached) gets no
gradient and its share of the backward is skipped (`set_materialize_grads(False)`). The gradient
is not differentiable again (`once_differentiable`): IAIS needs no double backward.
"""

from __future__ import annotations

import functools

import numpy
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

LOG_FLOOR = 1e-30
"""Clamp before a log: keeps -inf (and NaN gradients) out without moving any real value."""
DISTRIBUTED_EPS = 1e-6
"""Added inside the log of the logged side in distributed mode (as the official code)."""
ARGMAX_PENALTY = 2.0
"""Subtracted from padded columns before an argmax over probabilities (<= 1): never chosen."""


class _Layout:
    """One flat buffer holding a [P, n, n] matrix per pair for L, then a [P, m, m] one for V."""

    def __init__(self, pairs: int, words: int, visual: int):
        self.pairs, self.words, self.visual = pairs, words, visual
        self.split = pairs * words * words

    def empty(self, like: Tensor) -> Tensor:
        return like.new_empty(self.split + self.pairs * self.visual * self.visual)

    def views(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """flat [N] -> (L part [P, n, n], V part [P, m, m]), views sharing its memory."""
        return (
            flat[: self.split].view(self.pairs, self.words, self.words),
            flat[self.split :].view(self.pairs, self.visual, self.visual),
        )


@functools.lru_cache(maxsize=64)
def _segments(words: int, visual: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n + m, 2] one-hot: which of the concatenated mask columns are words (0) or visual tokens (1);
    per-modality counts and weights are then one matrix product each."""
    segments = torch.zeros(words + visual, 2, dtype=dtype, device=device)
    segments[:words, 0] = 1
    segments[words:, 1] = 1
    return segments


def _log_(x: Tensor) -> Tensor:
    """x.log_(). On the CPU through numpy, whose vectorised log takes 0.45 of the time of torch's on
    the machine measured (92,672 floats: 46 vs 102 us; `bench/bench_iais.py`); the loss takes one or
    two logs over all its terms, so that is 5-10 % of it. Same values to 1 ulp."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous():
        array = x.detach().numpy()
        numpy.log(array, out=array)
        return x
    return x.log_()


def _at_least_floor(x: Tensor) -> Tensor:
    """[x >= LOG_FLOOR] in x's dtype: where a clamp before a log passes the gradient."""
    return torch.ge(x, LOG_FLOOR, out=torch.empty_like(x))


def _weighted_rows(
    rows: tuple[Tensor, Tensor], row_weights: tuple[Tensor, Tensor], reduce: bool
) -> tuple[Tensor, Tensor]:
    """Per direction, row values [P, r] (a row's summed terms) weighted per row and summed per pair:
    ([P], [P]), or over pairs too (scalars)."""
    if reduce:
        return tuple(torch.dot(row.flatten(), weight.flatten()) for row, weight in zip(rows, row_weights))
    return tuple(torch.linalg.vecdot(row, weight) for row, weight in zip(rows, row_weights))


def _scale_by_weights(layout: _Layout, flats: tuple[Tensor, ...], grads, row_weights, col_masks=None) -> None:
    """Multiply each flat [N] gradient, in place, by d value / d t: grad[p] * [real row] / (real rows)
    (times [real column] where `col_masks` is given); a direction without gradient becomes 0."""
    parts = [layout.views(flat) for flat in flats]
    for index, (grad, row_weight) in enumerate(zip(grads, row_weights)):
        if grad is not None:  # [P] per pair, or a scalar for reduced outputs
            scale = ((grad[:, None] if grad.dim() else grad) * row_weight)[:, :, None]  # [P, r, 1]
        for views in parts:
            if grad is None:
                views[index].zero_()
            elif col_masks is None:
                views[index].mul_(scale)
            else:
                views[index].mul_(scale).mul_(col_masks[index])


class PairDivergences(torch.autograd.Function):
    """(s_ll, s_vv, s_lv, s_vl, word_mask, visual_mask, mode, normalization, reduce)
    -> (values_L, values_V): per pair ([P] each), or with `reduce` their means over the valid pairs.

    Blocks are float32/float64 (the caller converts); masks [P, n] / [P, m] bool. Per pair, a pair's
    value is meaningless (but finite) when it has no real word or no real visual token: the caller
    masks it; `reduce` leaves such pairs out itself.
    """

    @staticmethod
    def forward(
        ctx, s_ll, s_vv, s_lv, s_vl, word_mask, visual_mask, mode: str, normalization: str, reduce: bool = False
    ):
        ctx.set_materialize_grads(False)
        dtype = s_ll.dtype
        words = s_ll.shape[1]
        layout = _Layout(s_ll.shape[0], words, s_vv.shape[1])
        masks = torch.cat((word_mask, visual_mask), dim=1).to(dtype)  # [P, n + m]
        cols = (masks[:, None, :words], masks[:, None, words:])  # [P, 1, n], [P, 1, m]
        segments = _segments(words, s_vv.shape[1], dtype, s_ll.device)  # [n + m, 2]
        counts = masks @ segments  # [P, 2]: real words, real visual tokens
        scales = counts.clamp_min(1).reciprocal_()  # d value / d row sum
        if reduce:  # the mean over valid pairs (a real word and a real visual token): weight valid / #valid
            valid = counts.amin(dim=1, keepdim=True).clamp_(max=1.0)  # [P, 1] 0 / 1
            scales.mul_(valid / valid.sum().clamp_min(1.0))
        weights = masks * (scales @ segments.T)  # [P, n + m]
        row_weights = (weights[:, :words], weights[:, words:])  # [P, n], [P, m]
        target = layout.empty(s_ll)  # [N]: S_LL, S_VV with padded columns zeroed
        for part, block, col in zip(layout.views(target), (s_ll, s_vv), cols):
            torch.mul(block, col, out=part)
        pseudo = layout.empty(s_ll)
        if mode == "distributed":
            forward = _distributed_forward
            cross = (s_lv * cols[1], s_vl * cols[0])  # A [P, n, m], B [P, m, n]
        else:
            forward = _singular_forward
            cross = (s_lv, s_vl)
        values, saved = forward(layout, target, pseudo, cross, masks, cols, row_weights, normalization, reduce)
        ctx.layout, ctx.cols, ctx.row_weights, ctx.saved = layout, cols, row_weights, saved
        ctx.mode, ctx.normalization = mode, normalization
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_text, grad_image):
        grads = (grad_text, grad_image)
        if grad_text is None and grad_image is None:
            return (None,) * 9
        if ctx.mode == "distributed":
            d_ll, d_vv, d_lv, d_vl = _distributed_backward(ctx, grads)
            return d_ll, d_vv, d_lv, d_vl, None, None, None, None, None
        d_ll, d_vv = _singular_backward(ctx, grads)
        return d_ll, d_vv, None, None, None, None, None, None, None


def _singular_forward(layout, target, pseudo, cross, masks, cols, row_weights, normalization, reduce):
    targets = layout.views(target)  # S_LL, S_VV
    gathered_at = []
    biases = (None, None)
    if normalization == "softmax":  # padded columns get exactly 0
        bias = masks.sub(1.0).mul_(torch.finfo(masks.dtype).max)  # [P, n + m]: 0 real, finfo.min padded
        biases = (bias[:, None, : layout.words], bias[:, None, layout.words :])
    for part, cross_block, other, col, other_col, bias in zip(
        layout.views(pseudo), cross, targets[::-1], cols, cols[::-1], biases
    ):
        size = other.shape[-1]
        # r(i) = argmax over the other modality's real tokens; an index, so it carries no gradient. max(dim)
        # gives argmax's index (the first maximum; NaN wins) in half its time on rows this short (CPU).
        aligned = cross_block.add(other_col, alpha=ARGMAX_PENALTY).max(dim=-1).indices  # [P, r] (+2 real = -2 padded)
        flat = torch.add(aligned[:, None, :], aligned[:, :, None], alpha=size)  # [P, r, r] in the flattened s x s
        gathered_at.append(flat)
        if normalization == "softmax":
            gathered = other.flatten(1).gather(1, flat.flatten(1)).view(part.shape).add_(bias)
            torch.ops.aten._softmax.out(gathered, -1, False, out=part)
        else:
            torch.gather(other.flatten(1), 1, flat.flatten(1), out=part.flatten(1))
    totals = None
    if normalization == "sum":
        totals = []
        for part, col in zip(layout.views(pseudo), cols):
            part.mul_(col)
            totals.append(part.sum(dim=-1, keepdim=True))  # [P, r, 1]
            part.div_(totals[-1].clamp_min(LOG_FLOOR))
    floor_s = target.clamp_min(LOG_FLOOR)
    diff_log = _log_(pseudo.clamp_min(LOG_FLOOR).div_(floor_s))  # log max(p, floor) - log max(s, floor): one log
    diff = pseudo - target  # [N]
    rows = tuple(
        torch.linalg.vecdot(d, lg) for d, lg in zip(layout.views(diff), layout.views(diff_log))
    )  # no [N] product
    return _weighted_rows(rows, row_weights, reduce), (target, pseudo, floor_s, diff, diff_log, gathered_at, totals)


def _singular_backward(ctx, grads):
    layout, cols = ctx.layout, ctx.cols
    target, pseudo, floor_s, diff, diff_log, gathered_at, totals = ctx.saved
    # Fresh buffers are few on purpose: each costs page faults when the allocator has given memory back.
    d_pseudo = pseudo.clamp_min(LOG_FLOOR).reciprocal_().mul_(diff)  # (p - s) / p
    if ctx.normalization == "sum":  # a softmax row has no zero on a real column; a sum row may
        d_pseudo.mul_(pseudo >= LOG_FLOOR)
    d_pseudo.add_(diff_log)
    d_target = _at_least_floor(target).mul_(diff).div_(floor_s).add_(diff_log).neg_()
    _scale_by_weights(layout, (d_pseudo, d_target), grads, ctx.row_weights)
    d_targets = layout.views(d_target)
    for d_part, part, flat, d_other, grad, col, total in zip(
        layout.views(d_pseudo), layout.views(pseudo), gathered_at, d_targets[::-1], grads, cols, totals or (None, None)
    ):
        if grad is None:
            continue
        if ctx.normalization == "softmax":
            d_gathered = torch.ops.aten._softmax_backward_data(d_part, part, -1, part.dtype)
        else:
            # p = kept / max(total, floor): d kept = (d p - [total >= floor] sum(d p * p)) / max(total, floor)
            inner = torch.linalg.vecdot(d_part, part)[:, :, None] * (total >= LOG_FLOOR)
            d_gathered = (d_part - inner).div_(total.clamp_min(LOG_FLOOR)).mul_(col)
        d_other.flatten(1).scatter_add_(1, flat.flatten(1), d_gathered.flatten(1))  # repeats add up
    return d_targets


def _distributed_forward(layout, target, pseudo, cross, masks, cols, row_weights, normalization, reduce):
    text_to_visual, visual_to_text = cross  # A [P, n, m], B [P, m, n]
    pseudo_ll, pseudo_vv = layout.views(pseudo)
    torch.bmm(text_to_visual, visual_to_text, out=pseudo_ll)  # row-stochastic over real columns
    torch.bmm(visual_to_text, text_to_visual, out=pseudo_vv)
    eps_p, eps_s = pseudo + DISTRIBUTED_EPS, target + DISTRIBUTED_EPS
    log_ps = _log_(pseudo.clamp_min(LOG_FLOOR).div_(eps_s))  # log max(p, floor) - log(s + eps)
    log_sp = _log_(target.clamp_min(LOG_FLOOR).div_(eps_p))  # log max(s, floor) - log(p + eps)
    terms = (pseudo * log_ps).addcmul_(target, log_sp)  # [N]
    rows = tuple(part.sum(dim=-1) for part in layout.views(terms))
    return _weighted_rows(rows, row_weights, reduce), (target, pseudo, eps_p, eps_s, log_ps, log_sp, cross)


def _distributed_backward(ctx, grads):
    layout, (words, visual) = ctx.layout, ctx.cols
    target, pseudo, eps_p, eps_s, log_ps, log_sp, (text_to_visual, visual_to_text) = ctx.saved
    d_pseudo = _at_least_floor(pseudo).add_(log_ps).addcdiv_(target, eps_p, value=-1.0)
    d_target = _at_least_floor(target).add_(log_sp).addcdiv_(pseudo, eps_s, value=-1.0)
    # Padded columns of d_pseudo meet zeroed rows of B^T / A^T (and are masked below); d_target's need the mask.
    _scale_by_weights(layout, (d_pseudo,), grads, ctx.row_weights)
    _scale_by_weights(layout, (d_target,), grads, ctx.row_weights, ctx.cols)
    d_ll, d_vv = layout.views(d_pseudo)
    d_lv = d_vl = None
    if grads[0] is not None:  # P_LL = A @ B
        d_lv = d_ll @ visual_to_text.transpose(1, 2)  # [P, n, m]
        d_vl = text_to_visual.transpose(1, 2) @ d_ll  # [P, m, n]
    if grads[1] is not None:  # P_VV = B @ A
        d_vl = _add_product(d_vl, d_vv, text_to_visual.transpose(1, 2))
        d_lv = _add_product(d_lv, visual_to_text.transpose(1, 2), d_vv)
    d_targets = layout.views(d_target)
    return d_targets[0], d_targets[1], d_lv.mul_(visual), d_vl.mul_(words)


def _add_product(total: Tensor | None, left: Tensor, right: Tensor) -> Tensor:
    return left @ right if total is None else total.baddbmm_(left, right)


def pair_divergence_outputs(
    s_ll: Tensor,
    s_vv: Tensor,
    s_lv: Tensor,
    s_vl: Tensor,
    word_mask: Tensor,
    visual_mask: Tensor,
    mode: str,
    normalization: str,
    reduce: bool = False,
) -> tuple[Tensor, Tensor]:
    """Symmetric KL of direction L and of direction V, one autograd node: per pair ([P], [P]), or
    with `reduce` each direction's mean over the valid pairs (two scalars, 0 when none is valid)."""
    return PairDivergences.apply(s_ll, s_vv, s_lv, s_vl, word_mask, visual_mask, mode, normalization, reduce)
