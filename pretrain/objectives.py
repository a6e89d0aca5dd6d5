"""Pretraining objectives as pluggable parts of the one training loop.

An objective is any callable `objective(model, batch, progress) -> ObjectiveOutput`; the loop only
backpropagates `total` and logs `logs`. `PretrainObjective` combines ITC, ITM (hard negatives from
ITC similarities), MLM and IAIS on the matched pairs of the ITM pass; retrieval finetuning plugs its
own (e.g. hinge with hard negatives) into the same loop.

Padding slots (`sample_mask` False, DESIGN.md 3: equal batch counts per rank) weigh zero
everywhere: as queries, as keys and as negatives.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_tools.batch import IGNORE_INDEX
from pretrain.config import ObjectivesConfig


@dataclasses.dataclass
class Progress:
    """Where training stands, for objectives with schedules (IAIS weight, alternate directions)."""

    step: int
    total_steps: int


@dataclasses.dataclass
class ObjectiveOutput:
    """`total`: the scalar to backpropagate. `logs`: detached scalars named like the metrics keys
    (`loss/itc`, `loss/total`, `iais_weight`, `isd/L`, ...)."""

    total: torch.Tensor
    logs: dict[str, torch.Tensor]


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, Any], progress: Progress) -> ObjectiveOutput: ...


# --- helpers -------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 keeping the gradient (OpenCLIP's gather_with_grad).

    Backward sums every rank's gradient for our slice (all-reduce, then take the slice): gloo has no
    reduce-scatter, and torch.distributed.nn's fallback needs all_to_all, which gloo lacks too.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # [B, E] -> [world * B, E]
        rank, world = _world()
        ctx.rank, ctx.size = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [world * B, ...] in rank order; the identity on one process."""
    return _GatherWithGrad.apply(tensor) if _world()[1] > 1 else tensor


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if _world()[1] == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_world()[1])]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def image_id_codes(image_ids: list[str]) -> torch.Tensor:
    """[B] int64 codes of the image ids (stable across processes; "" for padding slots -> -1)."""
    codes = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=7).digest(), "little") if s else -1
             for s in image_ids]
    return torch.tensor(codes, dtype=torch.long)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for the loss (bf16/fp16 logits lose too much in log-softmax); float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the rows where `weights` is True; other rows (padding slots, whose
    values may be inf: every key masked) are selected away, not multiplied by zero."""
    keep = weights.bool()
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp(min=1).to(values.dtype)


# --- ITC -----------------------------------------------------------------------------------------
def itc_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, scale: torch.Tensor,
             codes: torch.Tensor, sample_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of local queries against keys gathered from every rank (local-loss style).

    text_emb, image_emb [B, E] L2-normalised; scale: the temperature's inverse (exp(logit_scale));
    codes [B] image-id codes; sample_mask [B] bool.
    A key with the same image id as the query (another caption of the same image) is not a negative;
    padding keys are masked out, padding queries weigh zero. Returns (loss, local similarity [B, B]
    detached, text x image, scaled by the temperature as ALBEF samples from, for hard negatives).
    """
    rank, _ = _world()
    b = text_emb.shape[0]
    all_text = gather_with_grad(text_emb)  # [W*B, E]
    all_image = gather_with_grad(image_emb)  # [W*B, E]
    all_codes = gather_no_grad(codes)  # [W*B]
    all_valid = gather_no_grad(sample_mask)  # [W*B]
    targets = torch.arange(b, device=codes.device) + rank * b  # [B]
    # A key is excluded when it is padding or shares the query's image without being its own pair.
    same_image = codes[:, None] == all_codes[None, :]  # [B, W*B]
    own = torch.zeros_like(same_image)
    own[torch.arange(b, device=codes.device), targets] = True
    excluded = (same_image & ~own) | ~all_valid[None, :]
    t2i = scale * text_emb @ all_image.T  # [B, W*B]
    i2t = scale * image_emb @ all_text.T  # [B, W*B]
    neg_inf = torch.finfo(t2i.dtype).min
    t2i = t2i.masked_fill(excluded, neg_inf)
    i2t = i2t.masked_fill(excluded, neg_inf)
    per_sample = (F.cross_entropy(_wide(t2i), targets, reduction="none")
                  + F.cross_entropy(_wide(i2t), targets, reduction="none")) / 2  # [B]
    local_sim = (scale * text_emb @ image_emb.T).detach()  # [B text, B image], temperature-scaled
    return _masked_mean(per_sample, sample_mask), local_sim


# --- ITM negatives -------------------------------------------------------------------------------
def sample_hard_negatives(similarity: torch.Tensor | None, codes: torch.Tensor,
                          sample_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-batch hard negatives (ALBEF): for each image a text, for each text an image.

    similarity [B text, B image] (None: uniform). Candidates exclude the same image id and padding;
    drawn with probability softmax(similarity) from the torch RNG (saved in checkpoints, so a resumed
    run draws the same). Returns (neg_text_for_image [B], neg_image_for_text [B], valid [B]) where
    valid is False for a sample without any candidate (its two negative rows weigh zero).
    """
    b = codes.shape[0]
    allowed = (codes[:, None] != codes[None, :]) & sample_mask[:, None] & sample_mask[None, :]  # [B, B]
    sim = torch.zeros(b, b, device=codes.device) if similarity is None else similarity.float()
    weights = torch.softmax(sim.masked_fill(~allowed, float("-inf")), dim=1)  # rows: text -> images
    has = allowed.any(dim=1)  # [B]
    weights = torch.where(has[:, None], weights, torch.ones_like(weights))
    neg_image_for_text = torch.multinomial(weights.nan_to_num(1.0), 1).squeeze(1)  # [B]
    weights_t = torch.softmax(sim.T.masked_fill(~allowed.T, float("-inf")), dim=1)  # rows: image -> texts
    weights_t = torch.where(has[:, None], weights_t, torch.ones_like(weights_t))
    neg_text_for_image = torch.multinomial(weights_t.nan_to_num(1.0), 1).squeeze(1)  # [B]
    return neg_text_for_image, neg_image_for_text, has


# --- the pretraining objective -------------------------------------------------------------------
class PretrainObjective:
    """ITC + ITM + MLM + IAIS with weights and switches (ObjectivesConfig) and an IAIS regularizer.

    Passes per micro-batch: unimodal text and image encodings (ITC), one joint pass over
    [positives; image + negative text; negative image + text] (ITM, IAIS on the positive rows only),
    one joint pass over the positives with masked words (MLM).
    """

    def __init__(self, config: ObjectivesConfig, iais_regularizer: Any | None = None):
        self.config = config
        self.iais = iais_regularizer

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any], progress: Progress) -> ObjectiveOutput:
        cfg = self.config
        model = getattr(model, "module", model)
        sample_mask = batch["sample_mask"]  # [B]
        codes = image_id_codes(batch["image_id"]).to(batch["input_ids"].device)  # [B]
        input_ids, text_mask = batch["input_ids"], batch["text_mask"]  # [B, Lt]
        visual_tokens, visual_mask = model.embed_visual(batch)  # [B, M, D], [B, M]
        b = input_ids.shape[0]
        logs: dict[str, torch.Tensor] = {}
        total = visual_tokens.new_zeros(())

        similarity = None
        if cfg.itc:
            text_emb = model.encode_text(input_ids, text_mask)  # [B, E]
            image_emb = model.encode_image(visual_tokens, visual_mask)  # [B, E]
            loss, similarity = itc_loss(text_emb, image_emb, model.itc_scale(), codes, sample_mask)
            total = total + cfg.itc_weight * loss
            logs["loss/itc"] = loss.detach()

        iais_on = self.iais is not None and getattr(self.iais.config, "enabled", False)
        if cfg.itm or iais_on:
            if cfg.itm:
                neg_text, neg_image, has_neg = sample_hard_negatives(
                    similarity if cfg.itm_hard_negatives else None, codes, sample_mask)
                ids = torch.cat([input_ids, input_ids[neg_text], input_ids])  # [3B, Lt]
                tmask = torch.cat([text_mask, text_mask[neg_text], text_mask])
                vis = torch.cat([visual_tokens, visual_tokens, visual_tokens[neg_image]])  # [3B, M, D]
                vmask = torch.cat([visual_mask, visual_mask, visual_mask[neg_image]])
            else:
                ids, tmask, vis, vmask = input_ids, text_mask, visual_tokens, visual_mask
            # IAIS on the matched pairs only: the first B rows, padding slots excluded.  # [len(ids)] bool
            iais_rows = torch.cat([sample_mask, torch.zeros(ids.shape[0] - b, dtype=torch.bool, device=sample_mask.device)]) if iais_on else None
            out = model(ids, tmask, vis, vmask, iais_rows=iais_rows)
            if cfg.itm:
                logits = model.itm_logits(out)  # [3B, 2]
                labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)
                weights = torch.cat([sample_mask, has_neg, has_neg])  # [3B]
                loss = _masked_mean(F.cross_entropy(_wide(logits), labels, reduction="none"), weights)
                total = total + cfg.itm_weight * loss
                logs["loss/itm"] = loss.detach()
            if iais_on:
                reg = self.iais(out.attention, progress.step, progress.total_steps)
                total = total + reg.loss
                logs["loss/iais"] = reg.raw.detach() if torch.is_tensor(reg.raw) else torch.tensor(float(reg.raw))
                logs["iais_weight"] = torch.as_tensor(float(reg.weight))
                for direction, value in (reg.isd or {}).items():
                    logs[f"isd/{direction}"] = torch.as_tensor(value).detach().float()

        if cfg.mlm:
            labels = batch["mlm_labels"].masked_fill(~sample_mask[:, None], IGNORE_INDEX)  # [B, Lt]
            positions = labels != IGNORE_INDEX  # [B, Lt] bool
            out = model(batch["mlm_input_ids"], text_mask, visual_tokens, visual_mask)
            logits = model.mlm_logits(out, positions)  # [N, V]: only masked positions
            if logits.shape[0]:
                loss = F.cross_entropy(_wide(logits), labels[positions])
            else:  # no masked word in this micro-batch: a zero that keeps the graph connected
                loss = model.mlm_logits(out).sum() * 0.0
            total = total + cfg.mlm_weight * loss
            logs["loss/mlm"] = loss.detach()

        logs["loss/total"] = total.detach()
        return ObjectiveOutput(total=total, logs=logs)
