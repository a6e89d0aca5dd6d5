"""The DeepSpeed engine: generated DeepSpeed config, AdamW parameter groups, warm-up + decay schedule.

Why a client optimizer: DeepSpeed's own `AdamW` JIT-compiles `fused_adam` (about 70 s on CPU);
`torch.optim.AdamW` with explicit parameter groups needs no compile and gives us the groups we want
(no weight decay on norms, biases and position tables; a learning-rate multiplier per module prefix).
The schedule is a `LambdaLR` so every group keeps its multiplier through warm-up and decay.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from data_tools.errors import ConfigError
from pretrain.config import Config, OptimizerConfig, ScheduleConfig


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """How the fixed global batch is split: global = per_rank x world_size x accumulation."""

    global_batch: int
    per_rank: int
    accumulation: int
    world_size: int


def batch_geometry(cfg: Config, world_size: int, global_batch: int | None = None) -> BatchGeometry:
    """Split the global batch over `world_size` ranks.

    The configured per-rank batch and accumulation are kept when they fit; otherwise (an elastic
    resume) the per-rank batch is the largest one <= the configured size for which the global batch
    divides evenly, and the accumulation makes up the rest.
    """
    per_rank, accum = cfg.data.batch_size, cfg.train.grad_accumulation
    target = global_batch or cfg.train.global_batch_size or per_rank * world_size * accum
    if per_rank * world_size * accum == target:
        return BatchGeometry(target, per_rank, accum, world_size)
    if target % world_size:
        raise ConfigError("train.global_batch_size", target, f"a multiple of the world size {world_size}")
    for size in range(min(per_rank, target // world_size), 0, -1):
        if target % (size * world_size) == 0:
            return BatchGeometry(target, size, target // (size * world_size), world_size)
    raise AssertionError("unreachable: size 1 always divides")


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm weights, biases and position tables are not decayed (1-D tensors cover norms/biases)."""
    lowered = name.lower()
    return param.ndim < 2 or "position" in lowered or "pos_embed" in lowered or "norm" in lowered


def _multiplier(name: str, multipliers: dict[str, float]) -> float:
    best, best_len = 1.0, -1
    for prefix, mult in multipliers.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = mult, len(prefix)
    return best


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Parameter groups keyed by (weight decay on/off, lr multiplier), in a deterministic order."""
    for prefix in cfg.lr_multipliers:
        if not any(n == prefix or n.startswith(prefix + ".") for n, _ in model.named_parameters()):
            raise ConfigError(f"optimizer.lr_multipliers.{prefix}", cfg.lr_multipliers[prefix],
                              "a prefix of a parameter name of the model")
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not _no_decay(name, param)
        mult = _multiplier(name, cfg.lr_multipliers)
        key = (decay, mult)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                           "lr": cfg.lr * mult, "lr_multiplier": mult}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def lr_lambda(schedule: ScheduleConfig, total_steps: int):
    """Factor of the peak lr at optimizer step `s` (0-based): linear warm-up, then decay."""
    warmup = schedule.warmup_steps
    floor = schedule.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule.decay == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule.decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config, geometry: BatchGeometry, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; `zero.deepspeed_config` is merged over it."""
    ds: dict[str, Any] = {
        "train_batch_size": geometry.global_batch,
        "train_micro_batch_size_per_gpu": geometry.per_rank,
        "gradient_accumulation_steps": geometry.accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.zero.stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.zero.stage == 3:
        # Small models: gather whole layers rather than prefetch tiny pieces.
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if cfg.zero.deepspeed_config:
        ds = _merge(ds, json.loads(Path(cfg.zero.deepspeed_config).read_text()))
    return ds


class TrainModule(torch.nn.Module):
    """The model and the objective as one module: DeepSpeed's forward runs the whole objective.

    Why: the objective calls several model methods (embed_visual, encode_text, forward, heads), and
    some read parameters outside their own module's forward (tied word embeddings, logit_scale).
    ZeRO 3 gathers such partitioned parameters on access only while the engine's forward is running,
    so the objective must run inside it. Parameter names gain the prefix `model.`.

    forward(batch, progress) -> (total loss, logs); forward(batch, progress, embed=True) -> ITC
    embeddings (text [B, E], image [B, E]) for the retrieval probe.
    """

    def __init__(self, model: torch.nn.Module, objective: Any):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Any], progress: Any, embed: bool = False):
        if embed:
            tokens, mask = self.model.embed_visual(batch)
            return self.model.encode_text(batch["input_ids"], batch["text_mask"]), self.model.encode_image(tokens, mask)
        out = self.objective(self.model, batch, progress)
        return out.total, out.logs


def build_engine(model: torch.nn.Module, objective: Any, cfg: Config, geometry: BatchGeometry, total_steps: int,
                 load_universal: bool = False):
    """`deepspeed.initialize` of TrainModule(model, objective) with a client AdamW (groups from the
    model's own parameter names) and a LambdaLR; returns (engine, scheduler)."""
    import deepspeed

    groups = param_groups(model, cfg.optimizer)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, total_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=TrainModule(model, objective), optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, geometry, load_universal),
    )
    return engine, scheduler
