"""Trainer overhead: samples/s of the trainer's step (DeepSpeed engine + objective module + the loop's
flag all-reduce, `pretrain.train.micro_step`) against a plain PyTorch loop with the same model, batch,
objective, AdamW parameter groups, LR schedule and gradient clipping. One process, CPU, no data
loading (one in-memory batch reused). The two loops alternate step by step and the medians of the
step times are compared, so load from other processes hits both alike. Prints one JSON object;
`ratio` = trainer samples/s / plain samples/s (aim: >= 0.9).

    python bench/bench_engine.py [--preset tiny] [--batch 16] [--steps 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch

from data_tools.batch import IGNORE_INDEX


def make_batch(b: int, text_len: int, image_size: int, vocab: int, seed: int = 0) -> dict:
    """A batch in the loader's format (data_tools/batch.py), built in memory."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, text_len + 1, (b,), generator=g)
    text_mask = torch.arange(text_len)[None] < lengths[:, None]  # [B, Lt]
    input_ids = torch.randint(5, vocab, (b, text_len), generator=g) * text_mask
    input_ids[:, 0] = 2
    input_ids[torch.arange(b), lengths - 1] = 3
    masked = (torch.rand(b, text_len, generator=g) < 0.15) & text_mask
    masked[:, 0] = False
    masked[:, 1] = True
    mlm_labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {
        "input_ids": input_ids,
        "text_mask": text_mask,
        "mlm_input_ids": torch.where(masked, 4, input_ids),
        "mlm_labels": mlm_labels,
        "sample_mask": torch.ones(b, dtype=torch.bool),
        "pixel_values": torch.randn(b, 3, image_size, image_size, generator=g),
        "image_id": [f"img{i}" for i in range(b)],
        "key": [str(i) for i in range(b)],
    }


def build(cfg, vocab: int):
    """The pretraining task's model and objective (what the trainer trains), fresh weights."""
    from pretrain.task import PretrainTask

    task = PretrainTask(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None)))
    torch.manual_seed(0)
    model = task.build_model(range(vocab), fresh=True, say=print)
    return model, task.objective()


def plain_loop(cfg, batch: dict, vocab: int, steps: int, total_steps: int):
    """The same training step written directly in PyTorch."""
    from pretrain.engine import lr_lambda, param_groups
    from pretrain.objectives import Progress

    model, objective = build(cfg, vocab)
    model.train()
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, cfg.optimizer)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=cfg.optimizer.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, total_steps))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> None:
        out = objective(model, batch, Progress(i, total_steps))
        if not torch.isfinite(out.total).item():
            raise RuntimeError("non-finite loss in the plain loop")
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainer_loop(cfg, batch: dict, vocab: int, steps: int, total_steps: int):
    """The trainer's own micro-step on a DeepSpeed engine built by pretrain.engine."""
    from pretrain.engine import EngineSpec, batch_geometry, build_engine
    from pretrain.objectives import Progress
    from pretrain.train import micro_step

    model, objective = build(cfg, vocab)
    spec = EngineSpec(cfg.optimizer, cfg.schedule, cfg.zero, cfg.precision, cfg.train.grad_clip)
    engine, _ = build_engine(model, objective, spec, batch_geometry(cfg.data.batch_size, 1, 1), total_steps)
    engine.train()

    def step(i: int) -> None:
        finite, _ = micro_step(engine, batch, Progress(i, total_steps))
        if not finite:
            raise RuntimeError("non-finite loss in the trainer loop")

    return step


def interleaved(plain, trainer, first: int, steps: int) -> tuple[list[float], list[float]]:
    """Per-step seconds of both loops, alternating step by step so that load from other processes
    on a shared machine hits both alike; medians are compared."""
    plain_s, trainer_s = [], []
    for i in range(first, first + steps):
        for step, out in (
            ((plain, plain_s), (trainer, trainer_s)) if i % 2 else ((trainer, trainer_s), (plain, plain_s))
        ):
            start = time.perf_counter()
            step(i)
            out.append(time.perf_counter() - start)
    return plain_s, trainer_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each loop (interleaved)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage of the trainer (fp32; one process)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)

    import logging
    from pathlib import Path

    import yaml

    from pretrain import dist_env
    from pretrain.config import config_from_dict

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    tree = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / f"{args.preset}.yaml").read_text())
    tree["data"]["batch_size"] = args.batch
    tree["zero"]["stage"] = args.zero
    cfg = config_from_dict(tree)  # no dataset needed: the batch is built in memory
    vocab = 1000
    batch = make_batch(args.batch, cfg.data.max_text_len, cfg.model.image_size, vocab)
    env = dist_env.detect()
    dist_env.init_distributed(env)
    total = args.steps + 10
    plain, trainer = (
        plain_loop(cfg, batch, vocab, args.steps, total),
        trainer_loop(cfg, batch, vocab, args.steps, total),
    )
    interleaved(plain, trainer, 0, 3)  # warm-up (allocator, first-call paths)
    plain_s, trainer_s = interleaved(plain, trainer, 3, args.steps)
    plain_sps = args.batch / statistics.median(plain_s)
    trainer_sps = args.batch / statistics.median(trainer_s)
    print(
        json.dumps(
            {
                "benchmark": "engine_overhead",
                "preset": args.preset,
                "batch": args.batch,
                "steps": args.steps,
                "threads": args.threads,
                "zero_stage": cfg.zero.stage,
                "precision": cfg.precision,
                "plain_samples_per_second": round(plain_sps, 2),
                "trainer_samples_per_second": round(trainer_sps, 2),
                "ratio": round(trainer_sps / plain_sps, 3),
            }
        )
    )
    dist_env.shutdown()
    dist_env.exit_process(0)


if __name__ == "__main__":
    main()
