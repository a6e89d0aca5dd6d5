"""The paper's retrieval finetuning loss: hard negatives mined by the current model, then a hinge on
sigmoid ITM scores (DESIGN.md 1).

For each matched pair of a batch built around an image: N candidate captions of other images are
scored by the model in eval mode under no_grad (`random_n`: N random pool captions, ITM scores;
`itc_topk`: the same draw ranked by ITC cosine, unimodal passes only), the H hardest are kept, and
the training pass scores [matched pairs; H negatives each] with
`mean(max(0, margin + sigmoid(s_neg) - sigmoid(s_pos)))`, s = ITM log-odds (logit matched - logit
not matched, so sigmoid(s) is the head's p(matched)). A batch built around a caption mines images
the same way. The training pass is the StepContext's joint pass over the matched pairs, so IAIS reads
their attention; the direction follows the batch kind (V for images, L for captions) when
`finetune.iais_by_batch_kind`. Candidate draws are seeded by (data.seed, step, key): a resumed run
mines the same candidates.

On a GPU mining costs one host read per step: the candidates' scores stay on the device until the
hardest are chosen, whose ids the host needs to fetch their captions or images from the store. Which
samples are real comes from the loader's own mask (`batch["host"]`), and what the host builds (rows,
captions, images) reaches the device through `pretrain.transfer.to_device`, without waiting.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from data_tools.batch import host_view
from data_tools.order import sample_seed
from data_tools.transforms import normalise_batch
from finetune.candidates import CandidateStore, draw_candidates, hardest, image_code
from pretrain.objectives import StepContext, Term, TermConfig
from pretrain.transfer import to_device

SCORE_CHUNK = 256
"""Candidate pairs per no_grad forward while mining."""


def match_score(
    model: Any,
    input_ids: Tensor,
    text_mask: Tensor,
    visual_tokens: Tensor,
    visual_mask: Tensor,
    ctx: StepContext | None = None,
    matched_rows: Tensor | None = None,
) -> Tensor:
    """ITM log-odds [rows] of a joint pass (through the StepContext when given, so IAIS sees it)."""
    if ctx is not None:
        out = ctx.joint(input_ids, text_mask, visual_tokens, visual_mask, matched_rows=matched_rows)
    else:
        out = model(input_ids, text_mask, visual_tokens, visual_mask)
    logits = model.itm_logits(out).float()  # [rows, 2]
    return logits[:, 1] - logits[:, 0]


def batch_kind(kinds: str, step: int) -> str:
    """ "image" or "caption" for this optimiser step."""
    if kinds == "alternate":
        return "image" if step % 2 == 0 else "caption"
    return kinds


class HardNegativeHinge(Term):
    name = "hinge"
    order = 20

    def __init__(self, config: Any, store: CandidateStore, data_seed: int):
        super().__init__(TermConfig(weight=1.0))
        self.ft = config
        self.store = store
        self.seed = data_seed

    def loss(self, ctx: StepContext) -> Tensor:
        kind = batch_kind(self.ft.batch_kinds, ctx.progress.step)
        if self.ft.iais_by_batch_kind:
            ctx.iais_direction = "V" if kind == "image" else "L"
        start = time.perf_counter()
        negatives, valid, scored = self._mine(ctx, kind)
        mining_s = time.perf_counter() - start
        ctx.logs["mining_seconds"] = torch.tensor(mining_s)
        ctx.logs["candidates_per_second"] = torch.tensor(scored / max(mining_s, 1e-9))
        return self._train_pass(ctx, kind, negatives, valid)

    # --- mining ----------------------------------------------------------------------------------
    def _generators(self, ctx: StepContext) -> list[torch.Generator | None]:
        keys, mask = ctx.batch["key"], host_view(ctx.batch)["sample_mask"].tolist()
        return [
            torch.Generator().manual_seed(sample_seed(self.seed, ctx.progress.step, k, "mining")) if m else None
            for k, m in zip(keys, mask)
        ]

    def _mine(self, ctx: StepContext, kind: str) -> tuple[Tensor, Tensor, int]:
        """Hard negatives [B, H] (pool caption ids or image rows) and which anchors have them [B], both
        on the host."""
        store, n, h = self.store, self.ft.candidates, self.ft.hard
        anchors = [image_code(store, i) for i in ctx.batch["image_id"]]
        pool_image = store.row_image[store.caption_row] if kind == "image" else store.row_image
        draw = draw_candidates(pool_image, anchors, n, self._generators(ctx))
        valid = draw.valid & host_view(ctx.batch)["sample_mask"].bool()
        if not bool(valid.any()):
            return draw.ids[:, :h], valid, 0
        model = ctx.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scores = self._score(ctx, kind, draw.ids, draw.valid)  # [B, N] on the device
        finally:
            model.train(was_training)
        return hardest(scores.cpu(), draw.ids, h), valid, int(draw.valid.sum()) * n  # the step's one host read

    def _score(self, ctx: StepContext, kind: str, ids: Tensor, rows_valid: Tensor) -> Tensor:
        model, batch, device = ctx.model, ctx.batch, ctx.sample_mask.device
        b, n = ids.shape
        scores = torch.full((b, n), float("-inf"), device=device)
        anchors = rows_valid.nonzero().flatten().tolist()
        flat = [(a, j) for a in anchors for j in range(n)]
        if self.ft.mining == "itc_topk":
            return self._score_itc(ctx, kind, ids, anchors, scores)
        visual_tokens, visual_mask = ctx.visual
        for start in range(0, len(flat), SCORE_CHUNK):
            part = flat[start : start + SCORE_CHUNK]
            rows = to_device(torch.tensor([a for a, _ in part]), device)
            cols = to_device(torch.tensor([j for _, j in part]), device)
            cand = [int(ids[a, j]) for a, j in part]
            if kind == "image":  # anchor image, candidate captions
                text = {k: to_device(v, device) for k, v in self.store.texts(cand).items()}
                vis, vmask = visual_tokens.index_select(0, rows), visual_mask.index_select(0, rows)
                s = match_score(model, text["input_ids"], text["text_mask"], vis, vmask)
            else:  # anchor caption, candidate images
                vis, vmask = model.embed_visual(_to(self.store.visual_batch(cand), device, visual_tokens.dtype))
                s = match_score(
                    model,
                    batch["input_ids"].index_select(0, rows),
                    batch["text_mask"].index_select(0, rows),
                    vis,
                    vmask,
                )
            scores[rows, cols] = s.float()
        return scores

    def _score_itc(self, ctx: StepContext, kind: str, ids: Tensor, anchors: list[int], scores: Tensor) -> Tensor:
        """Cosine of ITC embeddings: the anchors' own embedding against each candidate's."""
        model, batch, device = ctx.model, ctx.batch, ctx.sample_mask.device
        visual_tokens, visual_mask = ctx.visual
        if kind == "image":
            anchor_emb = model.encode_image(visual_tokens, visual_mask)  # [B, E]
        else:
            anchor_emb = model.encode_text(batch["input_ids"], batch["text_mask"])  # [B, E]
        for a in anchors:
            cand = ids[a].tolist()
            if kind == "image":
                text = {k: to_device(v, device) for k, v in self.store.texts(cand).items()}
                emb = model.encode_text(text["input_ids"], text["text_mask"])  # [N, E]
            else:
                vis, vmask = model.embed_visual(_to(self.store.visual_batch(cand), device, visual_tokens.dtype))
                emb = model.encode_image(vis, vmask)  # [N, E]
            scores[a] = (emb @ anchor_emb[a]).float()
        return scores

    # --- the training pass -----------------------------------------------------------------------
    def _train_pass(self, ctx: StepContext, kind: str, negatives: Tensor, valid: Tensor) -> Tensor:
        model, batch, device = ctx.model, ctx.batch, ctx.sample_mask.device
        b, h = negatives.shape
        input_ids, text_mask = batch["input_ids"], batch["text_mask"]  # [B, Lt]
        visual_tokens, visual_mask = ctx.visual  # [B, M, D]
        safe = torch.where(valid[:, None], negatives, torch.zeros_like(negatives)).clamp_min(0)  # [B, H], host
        if kind == "image":
            text = {k: to_device(v, device) for k, v in self.store.texts(safe.flatten().tolist()).items()}
            neg_ids, neg_tmask = text["input_ids"], text["text_mask"]  # [B*H, Lt]
            neg_vis = visual_tokens.repeat_interleave(h, dim=0)  # [B*H, M, D]
            neg_vmask = visual_mask.repeat_interleave(h, dim=0)
        else:
            neg_ids, neg_tmask = input_ids.repeat_interleave(h, dim=0), text_mask.repeat_interleave(h, dim=0)
            neg_vis, neg_vmask = model.embed_visual(
                _to(self.store.visual_batch(safe.flatten().tolist()), device, visual_tokens.dtype)
            )  # with gradient: these images train
        ids = torch.cat([input_ids, neg_ids])  # [B + B*H, Lt]
        tmask = torch.cat([text_mask, neg_tmask])
        m = max(visual_tokens.shape[1], neg_vis.shape[1])
        vis = torch.cat([_pad_tokens(visual_tokens, m), _pad_tokens(neg_vis, m)])  # [B + B*H, M, D]
        vmask = torch.cat([_pad_mask(visual_mask, m), _pad_mask(neg_vmask, m)])
        matched = batch.get("sample_rows")  # the real samples' rows, computed by the loader: no host read
        if matched is None:
            matched = torch.cat([ctx.sample_mask, torch.zeros(b * h, dtype=torch.bool, device=device)])
        scores = match_score(model, ids, tmask, vis, vmask, ctx=ctx, matched_rows=matched)  # [B + B*H]
        positive, negative = torch.sigmoid(scores[:b]), torch.sigmoid(scores[b:]).view(b, h)
        hinge = (self.ft.margin + negative - positive[:, None]).clamp_min(0)  # [B, H]
        weights = to_device(valid, device)[:, None].expand(b, h).to(hinge.dtype)
        return (hinge * weights).sum() / weights.sum().clamp_min(1.0)


def _to(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The store's host batch on the device without waiting, its uint8 pixels normalised there; floating
    tensors in `dtype` (cast there)."""
    moved = normalise_batch({k: to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in moved.items()}


def _pad_tokens(tokens: Tensor, m: int) -> Tensor:
    """[n, m0, D] -> [n, m, D] with zero tokens (masked out) when candidates have more visual tokens."""
    return tokens if tokens.shape[1] == m else torch.nn.functional.pad(tokens, (0, 0, 0, m - tokens.shape[1]))


def _pad_mask(mask: Tensor, m: int) -> Tensor:
    return mask if mask.shape[1] == m else torch.nn.functional.pad(mask, (0, m - mask.shape[1]), value=False)
