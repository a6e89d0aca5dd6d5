"""The one configuration of `python -m pretrain` (and `python -m finetune`): the sections that the
components own, assembled into one `Config` and validated together.

    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "optimizer.lr=1e-3"])

Sections and their owners: data (data_tools.loader), model (pretrain.model), iais (pretrain.iais),
objectives (pretrain.objectives.config: sampling and one section per registered term), optimizer /
schedule / zero (pretrain.engine), train / run (pretrain.run_config), eval (pretrain.evaluator),
checkpoint (pretrain.checkpoint), metrics (pretrain.metrics), profile (pretrain.profiling), and the
sections an entry point declares (`config_from_dict(tree, sections)`: `python -m finetune` passes
its `finetune` section), so nothing depends on which modules were imported before.
The machinery (types, overrides, messages): pretrain.config_schema. What needs files or hardware:
pretrain.preflight. Whether a checkpoint continues this run: pretrain.checkpoint.check_resume.
A configuration mistake is one ConfigError naming the dotted field (exit 2), before any process
group starts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from data_tools.errors import atomic_write_text, check
from data_tools.loader import DataConfig
from pretrain.checkpoint import CheckpointConfig
from pretrain.config_schema import apply_override, build, read_yaml, to_dict
from pretrain.engine import OptimizerConfig, ScheduleConfig, ZeroConfig
from pretrain.evaluator import EvalConfig
from pretrain.iais import IAISConfig
from pretrain.metrics import MetricsConfig
from pretrain.model import ModelConfig
from pretrain.objectives import ObjectivesConfig, import_plugins
from pretrain.preflight import check_environment
from pretrain.profiling import ProfileConfig
from pretrain.run_config import RunConfig, TrainConfig

__all__ = ["Config", "apply_override", "check_environment", "config_from_dict", "load_config", "save_config", "to_dict"]


@dataclasses.dataclass
class Config:
    """The resolved configuration of a run (saved as `<run>/config.yaml`)."""

    data: DataConfig
    model: ModelConfig
    iais: IAISConfig = dataclasses.field(default_factory=IAISConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    objectives: ObjectivesConfig = dataclasses.field(default_factory=ObjectivesConfig)
    """How the terms combine (objectives.sampling) and one section per registered term (objectives.itm.weight)."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (DeepSpeed mixed precision); fp16 needs a CUDA device."""
    tf32: bool = True
    """On CUDA, float32 matrix products and convolutions use TensorFloat-32 (Ampere and later: several times
    faster, 10-bit mantissa products with float32 sums); false keeps them full float32. No effect on CPU."""
    zero: ZeroConfig = dataclasses.field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    resume: str | None = None
    """None = fresh run, `auto` = newest complete checkpoint of the run if any, or a checkpoint path."""
    plugins: list[str] = dataclasses.field(default_factory=list)
    """Modules imported before validation (e.g. ones that register objective terms)."""
    finetune: Any = None
    """The finetuning section, built when the entry point declares it (`python -m finetune`:
    finetune.config.FinetuneConfig); otherwise left as the preset's plain mapping (or None)."""


def config_from_dict(tree: dict[str, Any], sections: Mapping[str, type] = {}) -> Config:
    """Validate a nested mapping into a Config (types, ranges, cross-field rules; no file checks).

    `sections`: the top-level sections the entry point declares beside the built-in ones (name ->
    its dataclass, e.g. {"finetune": FinetuneConfig}); each must name a field of Config."""
    tree = dict(tree)
    for required in ("data", "model"):
        check(required, None, required in tree, "a section (data and model are required)")
    plugins = tree.get("plugins") or []
    check(
        "plugins",
        plugins,
        isinstance(plugins, list) and all(isinstance(p, str) for p in plugins),
        "a list of module names",
    )
    import_plugins(plugins)  # before `objectives` is built: a plugin's terms are configurable
    tree.setdefault("objectives", None)
    declared = {}
    for name, section in sections.items():
        if name not in {f.name for f in dataclasses.fields(Config)}:
            raise ValueError(f"config_from_dict: section {name!r} has no field in pretrain.config.Config")
        value = tree.pop(name, None)
        declared[name] = None if value is None else build(section, value, name)
    cfg = build(Config, tree)
    for name, value in declared.items():
        setattr(cfg, name, value)
    check_architecture(cfg)
    check(
        "data.max_text_len",
        cfg.data.max_text_len,
        cfg.data.max_text_len <= cfg.model.max_text_len,
        f"at most model.max_text_len={cfg.model.max_text_len}",
    )
    check_objective_inputs(cfg)
    if cfg.train.global_batch_size:
        check(
            "train.global_batch_size",
            cfg.train.global_batch_size,
            cfg.train.global_batch_size % cfg.train.grad_accumulation == 0,
            f"a multiple of train.grad_accumulation={cfg.train.grad_accumulation}",
        )
    return cfg


def check_architecture(cfg: Config) -> None:
    """What `model.architecture` can train: a dual encoder has no attention across the modalities, so
    ITC is its only objective and IAIS is undefined; `iais.layers` must name layers the architecture
    has (two_stream: co-attention blocks). One ConfigError naming the field, before any process starts."""
    arch = cfg.model.architecture
    if arch == "dual_encoder":
        why = "false for model.architecture=dual_encoder (nothing attends across the modalities"
        check("iais.enabled", cfg.iais.enabled, not cfg.iais.enabled, why + ", so IAIS is undefined)")
        for name, section in cfg.objectives.terms.items():
            check(
                f"objectives.{name}.enabled",
                section.enabled,
                name == "itc" or not section.enabled,
                why + ": ITC is its only objective)",
            )
        return
    if cfg.iais.enabled:
        count = cfg.model.iais_layer_count
        what = (
            f"co-attention blocks (model.cross_layers={count})"
            if arch == "two_stream"
            else f"encoder layers (model.num_layers={count})"
        )
        check(
            "iais.layers",
            cfg.iais.layers,
            all(-count <= i < count for i in cfg.iais.layers),
            f"indices in [-{count}, {count}) of the {what}",
        )


def check_objective_inputs(cfg: Config) -> None:
    """What the optional objectives need from the data and model sections (no files read)."""
    if cfg.objectives.sampling == "per_batch":
        weights = [section.weight for section in cfg.objectives.terms.values() if section.enabled]
        check(
            "objectives.sampling",
            "per_batch",
            sum(weights) > 0,
            "joint, or an enabled objective with weight > 0 to draw (per_batch draws by weight)",
        )
    if cfg.objectives.enabled("tags"):
        check(
            "data.max_tag_len",
            cfg.data.max_tag_len,
            cfg.data.max_tag_len > 0,
            "an integer > 0 (the object tags' token length) with objectives.tags enabled",
        )
        combined = cfg.data.max_text_len + cfg.data.max_tag_len - 1
        check(
            "data.max_tag_len",
            cfg.data.max_tag_len,
            combined <= cfg.model.max_text_len,
            "at most model.max_text_len - data.max_text_len + 1 = "
            f"{cfg.model.max_text_len - cfg.data.max_text_len + 1} (words and tags share the text positions)",
        )
    if cfg.objectives.enabled("position"):
        check(
            "data.visual",
            cfg.data.visual,
            cfg.data.visual == "pixels",
            "pixels with objectives.position enabled (its single-shape views paint over pixels)",
        )
        if cfg.model.visual_embedder == "patch":
            std = cfg.model.visual_position_std or cfg.model.initializer_range
            check(
                "model.visual_position_std",
                cfg.model.visual_position_std,
                std >= 1.0,
                "at least 1.0 with objectives.position enabled (a smaller patch position table drowns in "
                "the patch content and the position captions stay at chance: set model.visual_position_std=1.0)",
            )


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML preset, apply the overrides in order, validate (including files on disk)."""
    tree = read_yaml(path) if path else {}
    for override in overrides:
        apply_override(tree, override)
    cfg = config_from_dict(tree)
    check_environment(cfg)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
