"""Can ITM learn the synthetic scenes' spatial relation? A diagnostic of why relation swaps sit at chance.

    python bench/itm_relation.py [--train-scenes 2048] [--kinds relation] [--steps 4000] [--positions learned|sincos]

Trains the `tiny` model's ITM (from scratch, 32 px scenes, batch 32, AdamW with cosine decay) on one
signal only: each training image against its true caption (matched) and against the same caption with
the relation (or the colours, `--kinds attribute`) swapped (not matched). Nothing else can lower the
loss, so a loss that stays at ln 2 means the model does not find the binding (colour word -> shape)
and the comparison (positions along the relation's axis) from this signal. Prints one JSON object per
check: the loss, the pair accuracy on the last 200 training batches (can it fit?) and on 1,024 held-out
scenes of another seed (does it generalise?); the baseline is chance, 0.5, and the held-out accuracy of
the untrained model (step 0) printed first. `--positions sincos` starts the patch position table from a
2D sin-cos table (x and y as low-frequency components) instead of the random one.

`--objective itm` trains the pretraining objective's ITM term instead (uniform random negatives plus
each image's own swapped caption, `objectives.itm.caption_negatives`, all kinds) and reports the held-out
accuracy per kind: the setting of tests/pretrain/test_itm_learns.py at other sizes and lengths.

`--objective curriculum` builds the relation in three phases (data_tools/curriculum.py): for
`--single-steps` steps, each image reduced to one of its shapes against "the red circle is left" vs
"... is right" (or above/below: the shape's half of the canvas); then for `--position-steps` steps the
same captions on the full scenes (the colour word must pick the shape); then, to `--steps`, relation
swaps plus the position captions; the patch position table starts at std 1.0 (`--position-std`). It
reports the held-out position accuracy on single shapes and on full scenes beside the swap accuracy per kind.

`--grounding-layers 0` adds what the relation's first step needs as direct supervision: at those layers,
minus the log of the attention mass each phrase word of the true caption puts on the patches of its own
shape (the `S_LV` block of the matched rows, head-averaged; boxes and phrase links from the scenes),
averaged over phrase words and layers, added with `--grounding-weight`; `grounding_mass` reports the
mean mass. It tests whether the comparison is learned once the binding is given.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sincos_table(grid: int, width: int) -> torch.Tensor:
    """[1, grid * grid, width]: half the channels encode the row, half the column, sin and cos at width/4
    frequencies each (MAE's 2D table)."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()[None]


def pair_logits(
    model, batch: dict, keep: torch.Tensor, grounding: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ITM logits [2n, 2] of [kept true pairs; the same images + swapped captions], and with `grounding`
    the grounding loss of the true pairs (None without)."""
    tokens, mask, token_boxes = model.embed_visual_with_boxes(batch)
    ids = torch.cat([batch["input_ids"][keep], batch["neg_input_ids"][keep]])
    text_mask = torch.cat([batch["text_mask"][keep], batch["neg_text_mask"][keep]])
    n = int(keep.sum())
    rows = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]) if grounding else None
    out = model(ids, text_mask, tokens[keep].repeat(2, 1, 1), mask[keep].repeat(2, 1), iais_rows=rows)
    if not grounding:
        return model.itm_logits(out), None
    chosen = keep.nonzero().flatten().tolist()
    return model.itm_logits(out), grounding_loss(model, out.attention, token_boxes[keep], batch, chosen)


def grounding_loss(model, attention: dict, token_boxes: torch.Tensor, batch: dict, chosen: list[int]) -> torch.Tensor:
    """Mean over layers and phrase words of -log(attention mass on the patches of the word's own shape)."""
    from pretrain.isd import phrase_words_and_tokens

    losses = []
    for blocks in attention.values():
        words, patches = phrase_words_and_tokens(
            blocks,
            token_boxes,
            model.visual.token_kind,
            [batch["phrase_tokens"][i] for i in chosen],
            [batch["phrase_boxes"][i] for i in chosen],
            [torch.as_tensor(batch["boxes"][i]).reshape(-1, 4) for i in chosen],
        )
        mass = torch.einsum("pnm,pqm->pqn", blocks.s_lv, patches.float())  # [P, Q, n]: word -> its phrase's patches
        valid = words & patches.any(-1, keepdim=True)
        losses.append(-(mass.clamp_min(1e-6).log() * valid).sum() / valid.sum().clamp_min(1))
    return torch.stack(losses).mean()


@torch.no_grad()
def position_accuracy(
    model, encode, batches: list[dict], categories: list[str], image_size: int, single: bool
) -> float:
    """Share of held-out position pairs (fixed draw) whose true caption has the larger ITM margin."""
    from data_tools.curriculum import position_pairs
    from pretrain.objectives.position import position_itm_logits

    model.eval()
    rng, wins = random.Random(123), []
    for batch in batches:
        pairs = position_pairs(batch, categories, image_size, rng)
        if pairs:
            logits = position_itm_logits(model, encode, batch, pairs, pairs if single else [])
            true, false = (logits[:, 1] - logits[:, 0]).chunk(2)
            wins += (true > false).tolist()
    model.train()
    return round(sum(wins) / max(len(wins), 1), 3)


def kept(batch: dict, kinds: set[str]) -> torch.Tensor:
    by_kind = torch.tensor([kind in kinds for kind in batch["negative_kind"]], dtype=torch.bool)
    return by_kind & batch["has_negative"].bool() & batch["sample_mask"].bool()


@torch.no_grad()
def held_out_accuracy(model, batches: list[dict], kinds: set[str]) -> dict[str, float]:
    """Per kind: the share of held-out images whose true caption has the larger ITM margin than its swap."""
    model.eval()
    wins: dict[str, list[bool]] = {kind: [] for kind in sorted(kinds)}
    for batch in batches:
        keep = kept(batch, kinds)
        if keep.any():
            logits, _ = pair_logits(model, batch, keep)
            true, swapped = (logits[:, 1] - logits[:, 0]).chunk(2)
            kinds_kept = [kind for kind, k in zip(batch["negative_kind"], keep.tolist()) if k]
            for kind, won in zip(kinds_kept, (true > swapped).tolist()):
                wins[kind].append(won)
    model.train()
    return {kind: round(sum(won) / max(len(won), 1), 3) for kind, won in wins.items()}


def build(out: Path, samples: int, seed: int, split: str) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "build",
            "synthetic",
            "--samples",
            str(samples),
            "--seed",
            str(seed),
            "--split",
            split,
            "--out",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return out


def main() -> None:
    from data_tools.collate import TextEncoder
    from data_tools.curriculum import position_pairs
    from data_tools.loader import DataConfig, Loader
    from data_tools.synthetic import NEGATIVE_KINDS
    from pretrain.config_schema import build as build_config
    from pretrain.model import ModelConfig
    from pretrain.model.model import RelAlignModel
    from pretrain.objectives import Progress, build_sections, pretraining_objective
    from pretrain.objectives.position import position_itm_logits, two_way_loss

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-scenes", type=int, default=2048)
    parser.add_argument("--test-scenes", type=int, default=1024)
    parser.add_argument(
        "--objective",
        choices=["pairs", "itm", "curriculum"],
        default="pairs",
        help="pairs: true vs swapped caption of --kinds only; itm: the ITM term with caption "
        "negatives; curriculum: single-shape position, full-scene position, then relation swaps",
    )
    parser.add_argument("--single-steps", type=int, default=1500, help="curriculum: single-shape phase")
    parser.add_argument("--position-steps", type=int, default=1500, help="curriculum: full-scene position phase")
    parser.add_argument("--kinds", default="relation", help="comma-separated negative kinds to train on (pairs)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--positions", choices=["learned", "sincos"], default="learned")
    parser.add_argument(
        "--position-std",
        type=float,
        default=None,
        help="model.visual_position_std (default: 1.0 with --objective curriculum, else the preset's)",
    )
    parser.add_argument("--grounding-layers", default="", help="comma-separated layers, e.g. 0 (default: none)")
    parser.add_argument("--grounding-weight", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.objective != "pairs" and args.grounding_layers:
        parser.error("--grounding-layers needs --objective pairs")
    if args.position_std is None and args.objective == "curriculum":
        args.position_std = 1.0  # what the position captions need (objectives.position requires it too)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kinds = set(args.kinds.split(",")) if args.objective == "pairs" else set(NEGATIVE_KINDS)
    trained = {"relation"} if args.objective == "curriculum" else kinds
    objective = None
    if args.objective == "itm":
        objective = pretraining_objective(
            build_sections(
                {"itc": False, "mlm": False, "itm": {"hard_negatives": False, "caption_negatives": True}}, build_config
            )
        )

    with tempfile.TemporaryDirectory() as tmp:
        train_dir = build(Path(tmp) / "train", args.train_scenes, seed=0, split="train")
        test_dir = build(Path(tmp) / "test", args.test_scenes, seed=1, split="test")
        data = dict(
            batch_size=32, image_size=32, max_text_len=16, crop_scale=(1.0, 1.0), tokenizer=str(train_dir / "tokenizer")
        )
        loader = Loader(DataConfig(paths=[str(train_dir)], **data))
        held_out = list(Loader(DataConfig(paths=[str(test_dir)], train=False, **data)))
        categories = sorted(loader.categories, key=loader.categories.get)
        encode = TextEncoder(loader.tokenizer, data["max_text_len"])
        pair_rng = random.Random(args.seed)
        model = RelAlignModel(
            ModelConfig.preset(
                "tiny",
                vocab_size=len(loader.tokenizer),
                image_size=32,
                num_layers=args.layers,
                width=args.width,
                **({} if args.position_std is None else {"visual_position_std": args.position_std}),
            )
        )
        grounding = bool(args.grounding_layers)
        if grounding:
            model.set_iais_layers(int(layer) for layer in args.grounding_layers.split(","))
        if args.positions == "sincos":
            with torch.no_grad():
                model.visual.position.copy_(sincos_table(model.visual.grid, args.width))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        )
        common = {
            "bench": "itm_relation",
            "kinds": sorted(kinds),
            "train_scenes": args.train_scenes,
            "test_scenes": args.test_scenes,
            "positions": args.positions,
            "layers": args.layers,
            "width": args.width,
            "lr": args.lr,
            "position_std": model.config.visual_position_std or model.config.initializer_range,
            "grounding_layers": args.grounding_layers or None,
            "objective": args.objective,
            "chance": 0.5,
        }
        if args.objective == "curriculum":
            common.update(single_steps=args.single_steps, position_steps=args.position_steps)

        def report() -> dict:
            out = {"held_out_accuracy": held_out_accuracy(model, held_out, kinds)}
            if args.objective == "curriculum":
                out["held_out_position"] = {
                    "single_shape": position_accuracy(model, encode, held_out, categories, data["image_size"], True),
                    "full_scene": position_accuracy(model, encode, held_out, categories, data["image_size"], False),
                }
            return out

        print(json.dumps({**common, "step": 0, **report()}), flush=True)
        step, start, train_wins = 0, time.perf_counter(), []
        while step < args.steps:
            for batch in loader:
                ground = None
                if objective is not None:
                    loss = itm = objective(model, batch, Progress(step, args.steps)).total
                elif args.objective == "curriculum":
                    pairs = position_pairs(batch, categories, data["image_size"], pair_rng)
                    if not pairs:
                        continue
                    single = step < args.single_steps
                    loss = itm = two_way_loss(position_itm_logits(model, encode, batch, pairs, pairs if single else []))
                    keep = kept(batch, trained)
                    if step >= args.single_steps + args.position_steps and keep.any():
                        logits, _ = pair_logits(model, batch, keep)
                        itm = two_way_loss(logits)
                        loss = loss + itm
                else:
                    keep = kept(batch, kinds)
                    if not keep.any():
                        continue
                    logits, ground = pair_logits(model, batch, keep, grounding)
                    n = int(keep.sum())
                    itm = two_way_loss(logits)
                    loss = itm if ground is None else itm + args.grounding_weight * ground
                    margin = (logits[:, 1] - logits[:, 0]).detach()
                    train_wins.append(float((margin[:n] > margin[n:]).float().mean()))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                step += 1
                if step % args.every == 0 or step == args.steps:
                    recent = train_wins[-200:]
                    extra = {} if ground is None else {"grounding_mass": round(math.exp(-ground.item()), 3)}
                    if recent:
                        extra["train_accuracy"] = round(sum(recent) / len(recent), 3)
                    print(
                        json.dumps(
                            {
                                **common,
                                "step": step,
                                "loss": round(itm.item(), 4),
                                **extra,
                                **report(),
                                "seconds": round(time.perf_counter() - start, 1),
                            }
                        ),
                        flush=True,
                    )
                if step >= args.steps:
                    break
            loader.set_epoch(loader.epoch + 1)


if __name__ == "__main__":
    main()
