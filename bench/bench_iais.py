"""Benchmark: the vectorised IAIS loss against a per-sample loop in the style of the published code.

Setting of issue 3: 32 matched pairs, 40 words, 36 visual tokens, 12 heads, width 768, CPU.
The baseline follows the published implementation's shape: one sample at a time, its lengths and
argmax moved to the host, the pseudo matrix gathered with host indices, one kl_div per sample.
Both run forward and backward, on the same inputs, in the same process; the ratio is the figure.

Two measurements, one JSON object each:
- `loss`: from the head-averaged attention blocks to the loss (what the regulariser adds).
- `blocks+loss`: from the layer's Q and K (per-head block softmaxes, head mean) to the loss.

    python bench/bench_iais.py [--threads 1] [--repeats 20] [--mode singular|distributed] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pretrain.iais import IAISConfig, IAISRegularizer
from pretrain.model.encoder import AttentionBlocks, BlockRequest, attention_blocks

PAIRS, WORDS, VISUAL, HEADS, WIDTH = 32, 40, 36, 12, 768


def make_inputs(seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    text_len = WORDS + 2
    length = text_len + VISUAL
    hidden = torch.randn(PAIRS, length, WIDTH, generator=g)
    query_proj, key_proj = (torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5 for _ in range(2))

    def heads(x):  # [P, L, W] -> [P, h, L, d]
        return x.view(PAIRS, length, HEADS, WIDTH // HEADS).transpose(1, 2)

    query, key = heads(hidden @ query_proj).to(device), heads(hidden @ key_proj).to(device)
    request = BlockRequest(rows=torch.arange(PAIRS, device=device), text_len=text_len,
                           word_mask=torch.ones(PAIRS, WORDS, dtype=torch.bool, device=device),
                           visual_mask=torch.ones(PAIRS, VISUAL, dtype=torch.bool, device=device))
    return query, key, request


def published_style_pair(s_ll, s_vv, s_lv, s_vl, mode):
    """One sample, both directions, as the published code: host argmax, host index gather."""
    loss = 0.0
    for cross, back, other, target in ((s_lv, s_vl, s_vv, s_ll), (s_vl, s_lv, s_ll, s_vv)):
        if mode == "singular":
            index = cross.argmax(dim=-1).cpu().tolist()
            pseudo = torch.softmax(other[index][:, index], dim=-1)
            log_in = torch.log
        else:
            pseudo = cross @ back
            def log_in(x):
                return torch.log(x + 1e-6)
        loss = loss + F.kl_div(log_in(target), pseudo, reduction="batchmean") \
            + F.kl_div(log_in(pseudo), target, reduction="batchmean")
    return loss


def published_style_from_blocks(blocks: AttentionBlocks, mode: str):
    losses = []
    for i in range(blocks.s_ll.shape[0]):
        n, m = int(blocks.word_mask[i].sum().item()), int(blocks.visual_mask[i].sum().item())
        losses.append(published_style_pair(blocks.s_ll[i, :n, :n], blocks.s_vv[i, :m, :m],
                                           blocks.s_lv[i, :n, :m], blocks.s_vl[i, :m, :n], mode))
    return torch.stack(losses).mean()


def published_style_from_qk(query, key, request: BlockRequest, mode: str):
    losses = []
    text_len = request.text_len
    for i in range(query.shape[0]):
        n, m = int(request.word_mask[i].sum().item()), int(request.visual_mask[i].sum().item())
        scores = query[i] @ key[i].transpose(-1, -2) / query.shape[-1] ** 0.5  # [h, L, L]
        words, visual = slice(1, 1 + n), slice(text_len, text_len + m)
        s_ll = torch.softmax(scores[:, words, words], dim=-1).mean(0)
        s_vv = torch.softmax(scores[:, visual, visual], dim=-1).mean(0)
        s_lv = torch.softmax(scores[:, words, visual], dim=-1).mean(0)
        s_vl = torch.softmax(scores[:, visual, words], dim=-1).mean(0)
        losses.append(published_style_pair(s_ll, s_vv, s_lv, s_vl, mode))
    return torch.stack(losses).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, inputs, repeats: int) -> tuple[float, float]:
    """Median seconds of forward+backward, and the loss value."""
    times, value = [], 0.0
    device = inputs[0].device
    for attempt in range(repeats + 2):
        leaves = [x.detach().requires_grad_() for x in inputs]
        _sync(device)
        start = time.perf_counter()
        loss = fn(*leaves)
        loss.backward()
        _sync(device)
        elapsed = time.perf_counter() - start
        if attempt >= 2:  # warm-up
            times.append(elapsed)
        value = float(loss.detach())
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--mode", choices=("singular", "distributed"), default="singular")
    parser.add_argument("--device", default="cpu", help="cpu (the issue's setting) or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    query, key, request = make_inputs(device=args.device)
    regularizer = IAISRegularizer(IAISConfig(mode=args.mode, direction="both", schedule="constant"), num_layers=1)

    def ours_from_blocks(s_ll, s_vv, s_lv, s_vl):
        blocks = AttentionBlocks(s_ll, s_vv, s_lv, s_vl, request.word_mask, request.visual_mask)
        return regularizer({0: blocks}, step=0, total_steps=1).raw

    def theirs_from_blocks(s_ll, s_vv, s_lv, s_vl):
        blocks = AttentionBlocks(s_ll, s_vv, s_lv, s_vl, request.word_mask, request.visual_mask)
        return published_style_from_blocks(blocks, args.mode)

    def ours_from_qk(q, k):
        return regularizer({0: attention_blocks(q, k, request)}, step=0, total_steps=1).raw

    def theirs_from_qk(q, k):
        return published_style_from_qk(q, k, request, args.mode)

    with torch.no_grad():
        b = attention_blocks(query, key, request)
    cases = (("loss", ours_from_blocks, theirs_from_blocks, (b.s_ll, b.s_vv, b.s_lv, b.s_vl)),
             ("blocks+loss", ours_from_qk, theirs_from_qk, (query, key)))
    for name, ours, theirs, inputs in cases:
        ours_s, ours_value = timed(ours, inputs, args.repeats)
        theirs_s, theirs_value = timed(theirs, inputs, args.repeats)
        print(json.dumps({
            "bench": "iais", "measure": name, "device": str(query.device) if query.device.type == "cpu"
            else torch.cuda.get_device_name(query.device), "mode": args.mode, "direction": "both", "pairs": PAIRS,
            "words": WORDS, "visual": VISUAL, "heads": HEADS, "width": WIDTH, "threads": args.threads,
            "vectorised_ms": round(ours_s * 1e3, 3), "per_sample_loop_ms": round(theirs_s * 1e3, 3),
            "speedup": round(theirs_s / ours_s, 2), "loss": ours_value, "loss_abs_diff": abs(ours_value - theirs_value),
        }), flush=True)


if __name__ == "__main__":
    main()
