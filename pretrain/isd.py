"""ISD and ISDa: how far a model's intra-modal relations disagree, measured in eval mode.

- ISD (per direction L, V): the IAIS loss quantity (`iais.pair_divergence`) over the matched pairs
  of a dataset, model in eval mode, averaged over pairs (and over the model's IAIS layers).
- ISDa (with phrase-to-box annotations). THIS DEFINITION IS OURS (DESIGN.md 1), not the paper's
  formula: for a pair, T_p = word tokens of phrase p, R_p = visual tokens of p's boxes (a patch or
  grid cell belongs to a box when its centre lies inside it; a detector region when IoU >= 0.5).
      A_L[p, q] = mean_{i in T_p} sum_{k in T_q} S_LL[i, k]
      A_V[p, q] = mean_{j in R_p} sum_{l in R_q} S_VV[j, l]
  rows renormalised over the linked phrases (those with at least one word and one visual token);
  ISDa = symmetric KL between A_L and A_V (same convention as the singular loss: target exact, logged
  side log(max(x, 1e-30))), averaged over rows and pairs. Pairs with fewer than two linked phrases
  have no relation to compare and are skipped. Lower = the text's and the image's relations agree.

`finetune/` runs these over evaluation sets and writes the reports.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from data_tools.errors import UserError

from .iais import pair_divergence, symmetric_kl
from .model.encoder import AttentionBlocks

IOU_THRESHOLD = 0.5


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes a [..., m, 4] and b [..., k, 4] (x1, y1, x2, y2) -> [..., m, k]."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp_min(1e-12)


def token_in_box(token_boxes: Tensor, boxes: Tensor, token_kind: str) -> Tensor:
    """Which visual tokens belong to which annotated box: [P, m, 4], [P, K, 4] -> [P, m, K] bool.

    "cell" (patch / grid): the token's centre lies inside the box; "region": IoU >= 0.5.
    """
    if token_kind == "region":
        return box_iou(token_boxes, boxes) >= IOU_THRESHOLD
    centre_x = (token_boxes[..., 0] + token_boxes[..., 2])[..., :, None] / 2  # [P, m, 1]
    centre_y = (token_boxes[..., 1] + token_boxes[..., 3])[..., :, None] / 2
    x1, y1, x2, y2 = (boxes[..., None, :, i] for i in range(4))  # [P, 1, K] each
    return (centre_x >= x1) & (centre_x <= x2) & (centre_y >= y1) & (centre_y <= y2)


def phrase_incidence(
    phrase_tokens: list[list[list[int]]],
    phrase_boxes: list[list[list[int]]],
    boxes: list[Tensor],
    words: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ragged annotations -> padded tensors (index preparation only; the math is vectorised).

    phrase_tokens[p][q]: token positions in input_ids ([CLS] = 0, so word column = position - 1);
    phrase_boxes[p][q]: indices into boxes[p] [k_p, 4].
    Returns phrase_words [P, Q, n] bool, phrase_box [P, Q, K] bool, padded boxes [P, K, 4].
    """
    pairs = len(phrase_tokens)
    phrases = max([len(p) for p in phrase_tokens] + [1])
    box_count = max([int(b.shape[0]) for b in boxes] + [1])
    phrase_words = torch.zeros(pairs, phrases, words, dtype=torch.bool)
    phrase_box = torch.zeros(pairs, phrases, box_count, dtype=torch.bool)
    padded = torch.zeros(pairs, box_count, 4)
    for p in range(pairs):
        padded[p, : boxes[p].shape[0]] = boxes[p].detach().float().cpu()
        for q, (positions, indices) in enumerate(zip(phrase_tokens[p], phrase_boxes[p])):
            columns = [pos - 1 for pos in positions if 1 <= pos <= words]
            phrase_words[p, q, columns] = True
            phrase_box[p, q, list(indices)] = True
    return phrase_words.to(device), phrase_box.to(device), padded.to(device)


def isda_values(
    s_ll: Tensor, s_vv: Tensor, word_mask: Tensor, visual_mask: Tensor, phrase_words: Tensor, phrase_visual: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-pair ISDa: (values [P], valid [P]).

    s_ll [P, n, n], s_vv [P, m, m], word_mask [P, n], visual_mask [P, m],
    phrase_words [P, Q, n] (T_p), phrase_visual [P, Q, m] (R_p), both bool.
    """
    phrase_words = phrase_words & word_mask[:, None, :]
    phrase_visual = phrase_visual & visual_mask[:, None, :]
    linked = phrase_words.any(dim=-1) & phrase_visual.any(dim=-1)  # [P, Q]
    dtype = torch.promote_types(s_ll.dtype, torch.float32)
    t, r = phrase_words.to(dtype), phrase_visual.to(dtype)  # [P, Q, n], [P, Q, m]
    mean_t = t / t.sum(dim=-1, keepdim=True).clamp_min(1.0)
    mean_r = r / r.sum(dim=-1, keepdim=True).clamp_min(1.0)
    relations_l = mean_t @ s_ll.to(dtype) @ t.transpose(1, 2)  # [P, Q, Q]
    relations_v = mean_r @ s_vv.to(dtype) @ r.transpose(1, 2)  # [P, Q, Q]

    def renormalise(a: Tensor) -> Tensor:
        a = a * linked[:, None, :]
        return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    values = symmetric_kl(renormalise(relations_l), renormalise(relations_v), linked, distributed=False)
    return values, linked.sum(dim=-1) >= 2


def _visual_rows(batch: dict, size: int) -> Tensor:
    rows = batch.get("sample_mask")
    return torch.ones(size, dtype=torch.bool) if rows is None else rows.bool().cpu()


@torch.no_grad()
def measure_isd(
    model, batches: Iterable[dict], mode: str = "singular", normalization: str = "softmax"
) -> dict[str, float]:
    """ISD per direction over the matched pairs of `batches` (eval mode, the model's IAIS layers).

    Returns {"L": mean, "V": mean, "pairs": count}.
    """
    was_training = model.training
    model.eval()
    sums = {"L": 0.0, "V": 0.0}
    pairs = 0
    try:
        for batch in batches:
            rows = _visual_rows(batch, batch["input_ids"].shape[0]).to(batch["input_ids"].device)
            visual_tokens, visual_mask = model.embed_visual(batch)
            out = model(batch["input_ids"], batch["text_mask"], visual_tokens, visual_mask, iais_rows=rows)
            if not out.attention:
                continue
            valid = None
            for direction in ("L", "V"):
                per_layer = [
                    pair_divergence(blocks, direction, mode, normalization) for blocks in out.attention.values()
                ]
                values = torch.stack([v for v, _ in per_layer]).mean(dim=0)  # [P]
                valid = per_layer[0][1]
                sums[direction] += float((values * valid).sum())
            pairs += int(valid.sum())
    finally:
        model.train(was_training)
    return {"L": sums["L"] / max(pairs, 1), "V": sums["V"] / max(pairs, 1), "pairs": pairs}


def phrase_words_and_tokens(
    blocks: AttentionBlocks,
    token_boxes: Tensor,
    token_kind: str,
    phrase_tokens: list,
    phrase_boxes: list,
    boxes: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """Each annotated phrase's word columns and visual tokens in the blocks of P pairs ->
    (phrase_words [P, Q, n] bool, phrase_visual [P, Q, m] bool: the tokens of the phrase's boxes)."""
    device = blocks.s_ll.device
    phrase_words, phrase_box, padded = phrase_incidence(
        phrase_tokens, phrase_boxes, boxes, blocks.word_mask.shape[1], device
    )
    member = token_in_box(token_boxes.to(device).float(), padded, token_kind)  # [P, m, K]
    return phrase_words, (phrase_box.float() @ member.float().transpose(1, 2)) > 0


def blocks_isda(
    blocks: AttentionBlocks,
    token_boxes: Tensor,
    token_kind: str,
    phrase_tokens: list,
    phrase_boxes: list,
    boxes: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """ISDa of P pairs from their attention blocks and annotations -> (values [P], valid [P])."""
    phrase_words, phrase_visual = phrase_words_and_tokens(
        blocks, token_boxes, token_kind, phrase_tokens, phrase_boxes, boxes
    )
    return isda_values(blocks.s_ll, blocks.s_vv, blocks.word_mask, blocks.visual_mask, phrase_words, phrase_visual)


@torch.no_grad()
def measure_isda(model, batches: Iterable[dict]) -> dict[str, float]:
    """ISDa over the annotated matched pairs of `batches` (eval mode, the model's last IAIS layer).

    Batches need `boxes`, `phrase_tokens`, `phrase_boxes` (data_tools.batch); with the `features`
    embedder also `image_hw` so region boxes and annotated boxes share pixel coordinates.
    Returns {"isda": mean, "pairs": count}.
    """
    kind = model.visual.token_kind
    was_training = model.training
    model.eval()
    total, pairs = 0.0, 0
    try:
        for batch in batches:
            for key in ("boxes", "phrase_tokens", "phrase_boxes"):
                if key not in batch:
                    raise UserError(f"ISDa needs batch[{key!r}]: the dataset has no phrase-to-box links")
            if kind == "region" and "image_hw" not in batch:
                raise UserError(
                    "ISDa with model.visual_embedder=features needs batch['image_hw'] to put region "
                    "boxes in the annotations' pixel coordinates"
                )
            size = batch["input_ids"].shape[0]
            rows = _visual_rows(batch, size) & torch.tensor([len(p) > 0 for p in batch["phrase_tokens"]])
            visual_tokens, visual_mask, token_boxes = model.embed_visual_with_boxes(batch)
            device = visual_tokens.device
            out = model(batch["input_ids"], batch["text_mask"], visual_tokens, visual_mask, iais_rows=rows.to(device))
            if not out.attention:
                continue
            blocks = out.attention[max(out.attention)]
            chosen = rows.nonzero().flatten().tolist()
            values, valid = blocks_isda(
                blocks,
                token_boxes[rows.to(device)],
                kind,
                [batch["phrase_tokens"][i] for i in chosen],
                [batch["phrase_boxes"][i] for i in chosen],
                [torch.as_tensor(batch["boxes"][i]).reshape(-1, 4) for i in chosen],
            )
            total += float((values * valid).sum())
            pairs += int(valid.sum())
    finally:
        model.train(was_training)
    return {"isda": total / max(pairs, 1), "pairs": pairs}
