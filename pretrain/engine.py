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
from typing import Any, Literal

import torch

from data_tools.errors import ConfigError, check
from pretrain.transfer import DeviceFeeder


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW (a client optimizer: no fused_adam JIT) with parameter groups."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW's (beta1, beta2); the paper's finetuning uses (0.9, 0.98)."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    weight_decay: float = 0.01
    """Applied to weight matrices only: never to norms, biases or position tables."""
    lr_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)
    """Module-name prefix -> learning-rate multiplier (longest prefix wins), e.g. {text: 0.1}."""
    fused: bool = False
    """torch's fused AdamW: one kernel per parameter group and step (CUDA and CPU) instead of torch's
    default loop of per-tensor kernels; the same update up to rounding."""

    def __post_init__(self) -> None:
        check("optimizer.fused", self.fused, isinstance(self.fused, bool), "true or false")
        check("optimizer.lr", self.lr, self.lr > 0, "a learning rate > 0")
        check("optimizer.betas", self.betas, all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        check("optimizer.eps", self.eps, self.eps > 0, "a value > 0")
        check("optimizer.weight_decay", self.weight_decay, self.weight_decay >= 0, "a value >= 0")
        for prefix, mult in self.lr_multipliers.items():
            check(f"optimizer.lr_multipliers.{prefix}", mult, mult >= 0, "a multiplier >= 0")


@dataclasses.dataclass
class ScheduleConfig:
    """Linear warm-up from 0 to the peak, then decay to `min_lr_ratio` x peak at the last step (over the
    whole run, or only its last `decay_steps`: warm-up, stable, decay)."""

    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to the peak learning rate."""
    decay: Literal["linear", "cosine", "constant"] = "cosine"
    """Shape of the decay after warm-up."""
    min_lr_ratio: float = 0.0
    """Learning rate at the last step, as a fraction of the peak."""
    decay_steps: int = 0
    """> 0: the peak holds after warm-up until the last `decay_steps` steps, which decay (warm-up, stable,
    decay: a curriculum whose phases end at varying steps starts its last phase at the peak either way);
    0: the decay spans every step after warm-up."""

    def __post_init__(self) -> None:
        check("schedule.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "an integer >= 0")
        check("schedule.decay_steps", self.decay_steps, self.decay_steps >= 0, "an integer >= 0 (0 = every step)")
        check("schedule.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "a ratio in [0, 1]")


@dataclasses.dataclass
class ZeroConfig:
    """DeepSpeed ZeRO stage and an optional raw DeepSpeed JSON merged over the generated config."""

    stage: int = 0
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters) partitioned."""
    deepspeed_config: str | None = None
    """Path of a DeepSpeed JSON; its keys override the generated ones (nested dicts merge)."""

    def __post_init__(self) -> None:
        check("zero.stage", self.stage, self.stage in (0, 1, 2, 3), "0, 1, 2 or 3")


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """How the fixed global batch is split: global = per_rank x world_size x accumulation."""

    global_batch: int
    per_rank: int
    accumulation: int
    world_size: int


def batch_geometry(per_rank: int, accumulation: int, world_size: int, global_batch: int = 0) -> BatchGeometry:
    """Split the global batch (0: per_rank x world x accumulation) over `world_size` ranks.

    The configured per-rank batch and accumulation are kept when they fit; otherwise (an elastic
    resume) the per-rank batch is the largest one <= the configured size for which the global batch
    divides evenly, and the accumulation makes up the rest.
    """
    target = global_batch or per_rank * world_size * accumulation
    if per_rank * world_size * accumulation == target:
        return BatchGeometry(target, per_rank, accumulation, world_size)
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


def param_groups(
    model: torch.nn.Module, cfg: OptimizerConfig, heads: torch.nn.Module | None = None
) -> list[dict[str, Any]]:
    """Parameter groups keyed by (weight decay on/off, lr multiplier), in a deterministic order.
    `heads`: the objective's own parameters (named `heads.*`), after the model's."""
    for prefix in cfg.lr_multipliers:
        if not any(n == prefix or n.startswith(prefix + ".") for n, _ in model.named_parameters()):
            raise ConfigError(
                f"optimizer.lr_multipliers.{prefix}",
                cfg.lr_multipliers[prefix],
                "a prefix of a parameter name of the model",
            )
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    named = list(model.named_parameters()) + (list(heads.named_parameters(prefix="heads")) if heads is not None else [])
    for name, param in named:
        if not param.requires_grad:
            continue
        decay = not _no_decay(name, param)
        mult = _multiplier(name, cfg.lr_multipliers)
        key = (decay, mult)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr": cfg.lr * mult,
                "lr_multiplier": mult,
            }
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
        start = max(warmup, total_steps - schedule.decay_steps) if schedule.decay_steps else warmup
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        if schedule.decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """The sections the engine is built from (precision and clipping come from the top level and
    `train`, where users set them)."""

    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    zero: ZeroConfig
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0
    tf32: bool = True


def set_tf32(enabled: bool, device_type: str) -> bool:
    """Let float32 matrix products (cuBLAS) and convolutions (cuDNN) use TensorFloat-32, or not: the
    config's `tf32`, applied once when the engine is built. Returns whether TF32 is on afterwards.

    Only CUDA has TF32, so on any other device this changes nothing and returns False. torch's per-backend
    flags are set rather than `torch.set_float32_matmul_precision("high")`, which would also switch
    oneDNN's CPU matmuls, and rather than the newer `fp32_precision` attributes, which torch refuses to
    read back through the older API once they are set (DeepSpeed and others still read it).
    """
    if device_type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def deepspeed_config(spec: EngineSpec, geometry: BatchGeometry, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; `zero.deepspeed_config` is merged over it."""
    ds: dict[str, Any] = {
        "train_batch_size": geometry.global_batch,
        "train_micro_batch_size_per_gpu": geometry.per_rank,
        "gradient_accumulation_steps": geometry.accumulation,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero.stage},
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {
            "enabled": spec.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if spec.zero.stage == 3:
        # Small models: gather whole layers rather than prefetch tiny pieces.
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if spec.zero.deepspeed_config:
        ds = _merge(ds, json.loads(Path(spec.zero.deepspeed_config).read_text()))
    return ds


class TrainModule(torch.nn.Module):
    """The model and the objective as one module: DeepSpeed's forward runs the whole objective.

    Why: the objective calls several model methods (embed_visual, encode_text, forward, heads), and
    some read parameters outside their own module's forward (tied word embeddings, logit_scale).
    ZeRO 3 gathers such partitioned parameters on access only while the engine's forward is running,
    so the objective must run inside it. Parameter names gain the prefix `model.`.

    forward(batch, progress) -> (total loss, logs); forward(batch, progress, embed=True) -> ITC
    embeddings (text [B, E], image [B, E]) for the retrieval probe.

    The objective's own parameters (`objective.heads`, e.g. MRM's regression head; absent or empty
    for most objectives) are registered as `heads`, so DeepSpeed trains, partitions and checkpoints
    them too; exports keep only the `model.` tensors (pretrain.export).
    """

    def __init__(self, model: torch.nn.Module, objective: Any):
        super().__init__()
        self.model = model
        self.objective = objective
        heads = getattr(objective, "heads", None)
        if heads is not None and len(heads):
            self.heads = heads

    def forward(self, batch: dict[str, Any], progress: Any, embed: bool = False):
        if embed:
            tokens, mask = self.model.embed_visual(batch)
            return self.model.encode_text(batch["input_ids"], batch["text_mask"]), self.model.encode_image(tokens, mask)
        out = self.objective(self.model, batch, progress)
        return out.total, out.logs


def build_engine(
    model: torch.nn.Module,
    objective: Any,
    spec: EngineSpec,
    geometry: BatchGeometry,
    total_steps: int,
    load_universal: bool = False,
):
    """`deepspeed.initialize` of TrainModule(model, objective) with a client AdamW (groups from the
    model's own parameter names) and a LambdaLR; returns (engine, scheduler)."""
    import deepspeed

    module = TrainModule(model, objective)
    groups = param_groups(model, spec.optimizer, getattr(module, "heads", None))
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=spec.optimizer.lr,
        betas=spec.optimizer.betas,
        eps=spec.optimizer.eps,
        weight_decay=spec.optimizer.weight_decay,
        **({"fused": True} if spec.optimizer.fused else {}),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.schedule, total_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(spec, geometry, load_universal),
    )
    set_tf32(spec.tf32, engine.device.type)
    return engine, scheduler


def model_dtype(engine: Any) -> torch.dtype:
    """The dtype of the engine's weights (bf16/fp16 engines hold half weights; ZeRO 3 partitions
    keep their dtype)."""
    return next(engine.module.parameters()).dtype


def to_engine(batch: dict[str, Any], engine: Any, feeder: DeviceFeeder | None = None) -> dict[str, Any]:
    """The batch on the engine's device, floating tensors in the model's dtype. Lists of tensors
    (per-sample boxes) move too; other values stay as they are.

    A loader batch's uint8 `pixel_uint8` [B, S, S, 3] moves as uint8 (a quarter of the bytes) and
    becomes normalised `pixel_values` [B, 3, S, S] on the device (data_tools.batch). The copies go
    through pinned staging without blocking the host (pretrain.transfer); the loader worker's pixel
    buffer (`pixel_lease`, data_tools.pixel_pool) is released once they have finished: nothing may
    read the batch's `pixel_uint8` after this call.

    feeder: the training loop's, kept across steps, so a batch's lease is released at a later step
    once its copy is done, without waiting for it. Without one (evaluation, tests), a feeder for this
    batch alone waits for the copy before releasing."""
    if feeder is not None:
        return feeder(batch, model_dtype(engine))
    once = DeviceFeeder(engine.device)
    moved = once(batch, model_dtype(engine))
    once.flush()
    return moved
