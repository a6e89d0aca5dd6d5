"""Benchmark: one training step (forward + backward, ITM + MLM [+ IAIS]) with IAIS on and off, CPU.

The step: embed the visual input, one joint pass over `[CLS] words [SEP] visual tokens` for a batch
of half matched pairs and half negatives (images rolled), ITM cross-entropy on every row, MLM
cross-entropy on 15% of the words, and with IAIS on the regulariser (singular, both directions,
last layer) on the matched rows; then backward. One pass for all objectives is the conservative
setting: the IAIS blocks cost the same while the rest of the step is smallest.

On and off steps are interleaved (so both see the same machine load) and the medians compared;
one JSON object per preset. The ratio on/off is the figure (aim: at most 1.10).

    python bench/bench_step.py [--presets small tiny] [--batch 8] [--threads 1] [--repeats 5] [--device cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pretrain.iais import IAISConfig, IAISRegularizer
from pretrain.model import ModelConfig, RelAlignModel

VOCAB = {"tiny": 1000, "small": 30522, "base": 30522, "large": 30522}
FEATURE_DIM = {"tiny": 64, "small": 2048, "base": 2048, "large": 2048}


def make_batch(batch: int, words: int, regions: int, vocab: int, feature_dim: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_len = words + 2
    input_ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, text_len), generator=g)
    mlm_positions = torch.rand(batch, text_len, generator=g) < 0.15
    mlm_positions[:, 0] = mlm_positions[:, -1] = False
    mlm_positions[:, 1] = True  # at least one masked word per row
    half = batch // 2
    return dict(
        input_ids=input_ids,
        text_mask=torch.ones(batch, text_len, dtype=torch.bool),
        mlm_positions=mlm_positions,
        mlm_targets=input_ids[mlm_positions],
        visual_feats=torch.randn(batch, regions, feature_dim, generator=g),
        visual_pos=torch.rand(batch, regions, 7, generator=g),
        visual_mask=torch.ones(batch, regions, dtype=torch.bool),
        itm_labels=torch.cat([torch.ones(half, dtype=torch.long), torch.zeros(batch - half, dtype=torch.long)]),
    )


def train_step(model: RelAlignModel, regularizer: IAISRegularizer | None, batch: dict) -> float:
    if batch["input_ids"].device.type == "cuda":
        torch.cuda.synchronize(batch["input_ids"].device)
    start = time.perf_counter()
    tokens, mask = model.embed_visual(batch)
    matched = batch["matched_cpu"]  # a CPU mask: no host sync to turn it into row indices
    out = model(
        batch["input_ids"], batch["text_mask"], tokens, mask, iais_rows=matched if regularizer is not None else None
    )
    loss = F.cross_entropy(model.itm_logits(out), batch["itm_labels"])
    loss = loss + F.cross_entropy(model.mlm_logits(out, batch["mlm_positions"]), batch["mlm_targets"])
    if regularizer is not None:
        loss = loss + regularizer(out.attention, step=900, total_steps=1000).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if loss.device.type == "cuda":
        torch.cuda.synchronize(loss.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu (the issue's setting) or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as the trainer's mixed precision)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.presets:
        torch.manual_seed(0)
        config = ModelConfig.preset(
            preset, vocab_size=VOCAB[preset], visual_embedder="features", feature_dim=FEATURE_DIM[preset]
        )
        model = RelAlignModel(config).to(args.device).train()
        regularizer = IAISRegularizer(IAISConfig(mode="singular", direction="both"), config.num_layers)
        regularizer.attach(model)
        batch = {
            k: v.to(args.device)
            for k, v in make_batch(args.batch, args.words, args.regions, VOCAB[preset], FEATURE_DIM[preset]).items()
        }
        batch["matched_cpu"] = batch["itm_labels"].cpu().bool()
        autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)
        off, on = [], []
        for attempt in range(args.repeats + 1):
            with autocast:
                times = (train_step(model, None, batch), train_step(model, regularizer, batch))
            if attempt:  # the first round warms up
                off.append(times[0])
                on.append(times[1])
        off_s, on_s = statistics.median(off), statistics.median(on)
        print(
            json.dumps(
                {
                    "bench": "step",
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                    "bf16": args.bf16,
                    "preset": preset,
                    "batch": args.batch,
                    "words": args.words,
                    "regions": args.regions,
                    "matched_pairs": args.batch // 2,
                    "threads": args.threads,
                    "repeats": args.repeats,
                    "iais_off_ms": round(off_s * 1e3, 2),
                    "iais_on_ms": round(on_s * 1e3, 2),
                    "ratio": round(on_s / off_s, 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
