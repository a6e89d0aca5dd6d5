"""The one configuration schema of `python -m pretrain`: YAML presets, dotted overrides, validation.

The schema assembles the owners' dataclasses (`data`, `model`, `iais`, `metrics`) with the trainer's
own sections below. Everything is checked before any process group starts: an unknown key, a wrong
type, an out-of-range value, a missing dataset folder or fp16 without CUDA each raise one
`ConfigError` naming the dotted field, the value and what is allowed (exit code 2 via `run_cli`).

    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "optimizer.lr=1e-3"])

YAML typing applies to overrides (`x=[a, b]` is a list, `x=null` is None); a string that reads as a
number is accepted for a float field because PyYAML reads `1e-4` as a string.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from data_tools.errors import ConfigError, UserError
from data_tools.loader import DataConfig
from pretrain.iais import IAISConfig
from pretrain.metrics import MetricsConfig
from pretrain.model import ModelConfig


def _check(field: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, value, allowed)


@dataclasses.dataclass
class ObjectivesConfig:
    """Which pretraining losses run and how they are weighted (IAIS: `iais.enabled`, `iais.weight`)."""

    itc: bool = True
    """Image-text contrastive loss (symmetric InfoNCE over features gathered from every rank)."""
    itc_weight: float = 1.0
    itm: bool = True
    """Image-text matching with hard negatives drawn from the ITC similarities (ALBEF)."""
    itm_weight: float = 1.0
    mlm: bool = True
    """Masked language modelling on `mlm_input_ids`/`mlm_labels`."""
    mlm_weight: float = 1.0
    itm_hard_negatives: bool = True
    """Sample ITM negatives by ITC similarity; False draws them uniformly among other images."""

    def __post_init__(self) -> None:
        for name in ("itc_weight", "itm_weight", "mlm_weight"):
            value = getattr(self, name)
            _check(f"objectives.{name}", value, value >= 0, "a weight >= 0")
        _check("objectives", "all off", self.itc or self.itm or self.mlm, "at least one of itc, itm, mlm on")


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW (a client optimizer: no fused_adam JIT) with parameter groups."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    """Applied to weight matrices only: never to norms, biases or position tables."""
    lr_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)
    """Module-name prefix -> learning-rate multiplier (longest prefix wins), e.g. {text: 0.1}."""

    def __post_init__(self) -> None:
        _check("optimizer.lr", self.lr, self.lr > 0, "a learning rate > 0")
        _check("optimizer.betas", self.betas, all(0 <= b < 1 for b in self.betas), "two values in [0, 1)")
        _check("optimizer.eps", self.eps, self.eps > 0, "a value > 0")
        _check("optimizer.weight_decay", self.weight_decay, self.weight_decay >= 0, "a value >= 0")
        for prefix, mult in self.lr_multipliers.items():
            _check(f"optimizer.lr_multipliers.{prefix}", mult, mult >= 0, "a multiplier >= 0")


@dataclasses.dataclass
class ScheduleConfig:
    """Linear warm-up from 0 to the peak, then decay to `min_lr_ratio` x peak at the last step."""

    warmup_steps: int = 0
    decay: Literal["linear", "cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check("schedule.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "an integer >= 0")
        _check("schedule.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "a ratio in [0, 1]")


@dataclasses.dataclass
class TrainConfig:
    """Length of the run, batch geometry, clipping, seeding and the loop's intervals."""

    steps: int = 0
    """Optimizer steps; 0 = derived from `epochs`."""
    epochs: int = 1
    """Used when `steps` is 0: that many passes over the data."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; 0 = data.batch_size x world size x grad_accumulation.
    Kept fixed on an elastic resume: the per-rank batch or the accumulation adapts."""
    grad_accumulation: int = 1
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    seed: int = 0
    log_every: int = 10
    """Steps between progress lines and metric records."""
    eval_every: int = 0
    """Steps between validations (and one at the end); 0 disables validation."""
    max_nonfinite_steps: int = 5
    """Stop (exit code NONFINITE, last good state saved) after this many non-finite steps in a row."""
    record_keys: bool = False
    """Append every consumed sample key to <run>/keys/rank<r>.txt ("epoch step key" lines): an audit of
    exactly-once data order across resumes."""
    lost_rank_timeout_s: float = 300.0
    """A rank that stops answering for this long makes the others exit naming it (watchdog)."""

    def __post_init__(self) -> None:
        _check("train.steps", self.steps, self.steps >= 0, "an integer >= 0 (0 = use train.epochs)")
        _check("train.epochs", self.epochs, self.epochs >= 1, "an integer >= 1")
        _check("train.global_batch_size", self.global_batch_size, self.global_batch_size >= 0, "an integer >= 0")
        _check("train.grad_accumulation", self.grad_accumulation, self.grad_accumulation >= 1, "an integer >= 1")
        _check("train.grad_clip", self.grad_clip, self.grad_clip >= 0, "a norm >= 0 (0 = off)")
        _check("train.log_every", self.log_every, self.log_every >= 1, "an integer >= 1")
        _check("train.eval_every", self.eval_every, self.eval_every >= 0, "an integer >= 0 (0 = off)")
        _check("train.max_nonfinite_steps", self.max_nonfinite_steps, self.max_nonfinite_steps >= 1, "an integer >= 1")
        _check("train.lost_rank_timeout_s", self.lost_rank_timeout_s, self.lost_rank_timeout_s > 0, "seconds > 0")


@dataclasses.dataclass
class EvalConfig:
    """Validation inside the loop: held-out losses and an optional R@1 probe by ITC."""

    paths: list[str] = dataclasses.field(default_factory=list)
    """Validation dataset folders; empty = the training folders read in eval mode."""
    batches: int = 4
    """Batches per rank for the held-out losses."""
    retrieval_probe: bool = False
    """Also compute text->image and image->text R@1 by ITC on the validation batches."""

    def __post_init__(self) -> None:
        _check("eval.batches", self.batches, self.batches >= 1, "an integer >= 1")


@dataclasses.dataclass
class ZeroConfig:
    """DeepSpeed ZeRO stage and an optional raw DeepSpeed JSON merged over the generated config."""

    stage: int = 0
    deepspeed_config: str | None = None
    """Path of a DeepSpeed JSON; its keys override the generated ones (nested dicts merge)."""

    def __post_init__(self) -> None:
        _check("zero.stage", self.stage, self.stage in (0, 1, 2, 3), "0, 1, 2 or 3")


@dataclasses.dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = 0
    """Steps between checkpoints (0 = only at the end, on preemption and on non-finite stops)."""
    keep_last: int = 3
    at_end: bool = True

    def __post_init__(self) -> None:
        _check("checkpoint.every_steps", self.every_steps, self.every_steps >= 0, "an integer >= 0 (0 = off)")
        _check("checkpoint.keep_last", self.keep_last, self.keep_last >= 1, "an integer >= 1")


@dataclasses.dataclass
class RunConfig:
    """The run directory (config.yaml, checkpoints/, metrics.jsonl, eval/) and the run's label."""

    dir: str = "runs/run"
    """The run directory itself; `--resume auto` looks for checkpoints in it."""
    name: str = ""
    """Label of the run in metrics (`run` label); empty = the directory's name."""

    def __post_init__(self) -> None:
        _check("run.dir", self.dir, bool(self.dir), "a directory path")
        if not self.name:
            self.name = Path(self.dir).resolve().name

    @property
    def path(self) -> Path:
        return Path(self.dir)


@dataclasses.dataclass
class Config:
    """The resolved configuration of a pretraining run (saved as `<run>/config.yaml`)."""

    data: DataConfig
    model: ModelConfig
    iais: IAISConfig = dataclasses.field(default_factory=IAISConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    objectives: ObjectivesConfig = dataclasses.field(default_factory=ObjectivesConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero: ZeroConfig = dataclasses.field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    resume: str | None = None
    """None = fresh run, `auto` = newest complete checkpoint of the run if any, or a checkpoint path."""


RESUME_MUTABLE = (
    "data.paths", "data.workers", "data.batch_size", "data.weights", "data.tokenizer",
    "metrics", "run", "resume", "eval", "train.log_every", "train.eval_every", "train.lost_rank_timeout_s", "train.record_keys",
    "train.grad_accumulation", "checkpoint", "zero.deepspeed_config",
)
"""Fields that may differ between a checkpoint's config and the resuming run's (world size too).
Any other difference is refused: the resumed run would not continue the same training."""


# --- building dataclasses from plain data ---------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists/strings where YAML is loose."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, field)
            except ConfigError:
                continue
        raise ConfigError(field, value, _type_name(tp))
    if origin is Literal:
        _check(field, value, value in args, " | ".join(repr(a) for a in args))
        return value
    if dataclasses.is_dataclass(tp):
        _check(field, value, isinstance(value, dict), f"a mapping of {tp.__name__} fields")
        return build(tp, value, field)
    if tp is bool:
        _check(field, value, isinstance(value, bool), "true or false")
        return value
    if tp is int:
        _check(field, value, isinstance(value, int) and not isinstance(value, bool), "an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _check(field, value, isinstance(value, (int, float)) and not isinstance(value, bool), "a number")
        return float(value)
    if tp is str:
        _check(field, value, isinstance(value, str), "a string")
        return value
    if origin in (list, tuple, Sequence):
        if isinstance(value, str) and origin is list:
            value = [value]  # `data.paths=/x` means one path
        _check(field, value, isinstance(value, (list, tuple)), f"a list ({_type_name(tp)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            _check(field, value, len(value) == len(args), f"{len(args)} values ({_type_name(tp)})")
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _check(field, value, isinstance(value, dict), f"a mapping ({_type_name(tp)})")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, field): _coerce(v, val_tp, f"{field}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        _check(field, value, isinstance(value, tp), _type_name(tp))
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping: unknown keys and wrong types are ConfigErrors.

    A `preset` key is passed to `cls.preset(name, **rest)` where the class offers one (ModelConfig).
    A ConfigError raised by the class's own validation gets the dotted prefix added to its field.
    """
    values = dict(values)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    preset = values.pop("preset", None) if hasattr(cls, "preset") else None
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            allowed = ", ".join(sorted(fields)) + (", preset" if hasattr(cls, "preset") else "")
            raise ConfigError(name, value, f"one of the keys {allowed}")
        kwargs[key] = _coerce(value, hints[key], name)
    try:
        if preset is not None:
            _check(f"{prefix}.preset", preset, isinstance(preset, str), "a preset name")
            return cls.preset(preset, **kwargs)
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and not err.field.startswith(prefix + ".") and err.field != prefix:
            raise ConfigError(f"{prefix}.{err.field}", err.value, err.allowed) from None
        raise
    except TypeError as err:  # a required field is missing
        raise ConfigError(prefix or cls.__name__, values, f"all required fields of {cls.__name__} ({err})") from None
    except ValueError as err:  # an owner's validation that is not a ConfigError
        raise ConfigError(prefix or cls.__name__, values, str(err)) from None


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON data of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --- loading --------------------------------------------------------------------------------------
def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"config file {path}: cannot be read ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value read as YAML) to a nested dict in place."""
    if "=" not in override:
        raise UserError(f"override {override!r}: expected dotted.field=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise UserError(f"override {override!r}: expected dotted.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), child, "a section (it has no sub-fields)")
        node = child
    node[keys[-1]] = value


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Validate a nested mapping into a Config (types, ranges, cross-field rules; no file checks)."""
    if "data" not in tree or "model" not in tree:
        missing = "data" if "data" not in tree else "model"
        raise ConfigError(missing, None, "a section (data and model are required)")
    cfg = build(Config, tree)
    _check("data.max_text_len", cfg.data.max_text_len, cfg.data.max_text_len <= cfg.model.max_text_len,
           f"at most model.max_text_len={cfg.model.max_text_len}")
    if cfg.train.global_batch_size:
        _check("train.global_batch_size", cfg.train.global_batch_size,
               cfg.train.global_batch_size % cfg.train.grad_accumulation == 0,
               f"a multiple of train.grad_accumulation={cfg.train.grad_accumulation}")
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML preset, apply the overrides in order, validate (including files on disk)."""
    tree = _read_yaml(path) if path else {}
    for override in overrides:
        apply_override(tree, override)
    cfg = config_from_dict(tree)
    check_environment(cfg)
    return cfg


def check_environment(cfg: Config) -> None:
    """Checks that need the file system or the hardware: dataset folders, DeepSpeed JSON, fp16."""
    for section, paths in (("data.paths", cfg.data.paths), ("eval.paths", cfg.eval.paths)):
        if section == "data.paths":
            _check(section, paths, len(paths) > 0, "at least one dataset folder")
        for i, p in enumerate(paths):
            if "://" in p or p.startswith("pipe:"):
                continue
            _check(f"{section}[{i}]", p, (Path(p) / "dataset.json").is_file(),
                   "an existing dataset folder with dataset.json (build one with `python -m data_tools build`)")
    if cfg.zero.deepspeed_config is not None:
        p = Path(cfg.zero.deepspeed_config)
        _check("zero.deepspeed_config", str(p), p.is_file(), "an existing DeepSpeed JSON file")
        try:
            data = json.loads(p.read_text())
        except ValueError as err:
            raise ConfigError("zero.deepspeed_config", str(p), f"valid JSON ({err})") from None
        _check("zero.deepspeed_config", str(p), isinstance(data, dict), "a JSON object")
        adopt_raw_deepspeed(cfg, data)
    if cfg.model.init_from is not None:
        check_init_vocabulary(cfg)
    if cfg.precision == "fp16":
        import torch

        _check("precision", "fp16", torch.cuda.is_available(),
               "fp32 or bf16 on this machine (fp16 needs a CUDA device)")


def check_init_vocabulary(cfg: Config) -> None:
    """`model.init_from` must have been trained with the data tokenizer's vocabulary.

    The model's vocab_size is the tokenizer's size (Trainer.setup), so a checkpoint whose word
    embedding table has another number of rows cannot load; say so here, before any process group
    starts, instead of in every rank's setup. A tokenizer that is not a local folder (a remote
    dataset without data.tokenizer) is left to the loader's own error.
    """
    from data_tools.collate import load_tokenizer
    from data_tools.loader import tokenizer_folder
    from pretrain.model.hf_init import checkpoint_vocab_size

    folder = tokenizer_folder(cfg.data)
    if "://" in str(folder) or not folder.is_dir():
        return
    tokenizer_size = len(load_tokenizer(folder))
    checkpoint_size = checkpoint_vocab_size(cfg.model.init_from)
    if checkpoint_size != tokenizer_size:
        raise UserError(
            f"model.init_from={cfg.model.init_from}: its word embeddings have {checkpoint_size} rows but the data "
            f"tokenizer {folder} has {tokenizer_size} tokens; point data.tokenizer at the checkpoint's own "
            f"tokenizer folder (e.g. data.tokenizer=minilm for model.init_from=minilm)")


def adopt_raw_deepspeed(cfg: Config, data: dict[str, Any]) -> None:
    """The raw DeepSpeed JSON is merged over the generated one, so where it sets the ZeRO stage or
    the precision, those win; copy them into the config so config.yaml, logs and checkpoints say
    what actually runs."""
    stage = (data.get("zero_optimization") or {}).get("stage")
    if stage is not None:
        _check("zero.deepspeed_config", f"{cfg.zero.deepspeed_config}: zero_optimization.stage={stage!r}",
               stage in (0, 1, 2, 3), "a ZeRO stage 0, 1, 2 or 3")
        cfg.zero.stage = stage
    for precision in ("bf16", "fp16"):
        if (data.get(precision) or {}).get("enabled") is True:
            cfg.precision = precision


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def _strip(tree: dict[str, Any], dotted: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.get(key, {})
        if not isinstance(node, dict):
            return
    node.pop(keys[-1], None)


def training_identity(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """The config without the fields a resume may change (RESUME_MUTABLE)."""
    tree = json.loads(json.dumps(to_dict(cfg) if not isinstance(cfg, dict) else cfg))
    for dotted in RESUME_MUTABLE:
        _strip(tree, dotted)
    return tree


def config_hash(cfg: Config | dict[str, Any]) -> str:
    """sha256 of the training identity: equal for configs that train the same run."""
    blob = json.dumps(training_identity(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def resume_differences(saved: dict[str, Any], current: Config) -> list[str]:
    """Dotted fields whose values differ between a checkpoint's config and this run's."""
    a, b = training_identity(saved), training_identity(current)
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                walk(x.get(key), y.get(key), f"{path}.{key}" if path else key)
        elif x != y:
            out.append(f"{path}: {x!r} -> {y!r}")

    walk(a, b, "")
    return out
