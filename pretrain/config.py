"""The one configuration of `python -m pretrain` (and `python -m finetune`): it assembles the
sections that the components own, and checks what needs files or hardware.

    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "optimizer.lr=1e-3"])

Sections and their owners: data (data_tools.loader), model (pretrain.model), iais (pretrain.iais),
objectives (pretrain.objectives: one section per registered term), optimizer / schedule / zero
(pretrain.engine), train / run (pretrain.train), eval (pretrain.evaluator), checkpoint
(pretrain.checkpoint), metrics (pretrain.metrics), and sections registered by a higher layer
(`register_section`: finetuning's). The machinery (types, overrides, messages): pretrain.config_schema.
Checked before any process group starts: a configuration mistake is one ConfigError naming the
dotted field (exit 2); a dataset folder with a malformed dataset.json is a data error (exit 3)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from data_tools.errors import ConfigError, ExitCode, UserError, atomic_write_text, check
from data_tools.loader import DataConfig
from pretrain.checkpoint import CheckpointConfig, read_client_state, resolve_resume
from pretrain.config_schema import apply_override, build, read_yaml, to_dict
from pretrain.engine import OptimizerConfig, ScheduleConfig, ZeroConfig
from pretrain.evaluator import EvalConfig
from pretrain.iais import IAISConfig
from pretrain.metrics import MetricsConfig
from pretrain.model import ModelConfig
from pretrain.objectives import build_sections, import_plugins, term_sections
from pretrain.profiling import ProfileConfig
from pretrain.train import RunConfig, TrainConfig

@dataclasses.dataclass
class Config:
    """The resolved configuration of a run (saved as `<run>/config.yaml`)."""

    data: DataConfig
    model: ModelConfig
    iais: IAISConfig = dataclasses.field(default_factory=IAISConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    objectives: dict[str, Any] = dataclasses.field(default_factory=dict)
    """One section per registered objective term (pretrain.objectives), e.g. objectives.itm.weight."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (DeepSpeed mixed precision); fp16 needs a CUDA device."""
    zero: ZeroConfig = dataclasses.field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    resume: str | None = None
    """None = fresh run, `auto` = newest complete checkpoint of the run if any, or a checkpoint path."""
    plugins: list[str] = dataclasses.field(default_factory=list)
    """Modules imported before validation (e.g. ones that register objective terms)."""
    finetune: Any = None
    """The finetuning task's section (finetune.config.FinetuneConfig); None in pretraining."""


RESUME_MUTABLE = (
    "data.paths", "data.workers", "data.batch_size", "data.weights", "data.tokenizer",
    "metrics", "run", "resume", "eval", "profile", "train.log_every", "train.lost_rank_timeout_s", "train.record_keys",
    "train.grad_accumulation", "checkpoint", "zero.deepspeed_config",
)
"""Fields that may differ between a checkpoint's config and the resuming run's (world size too).
Any other difference is refused: the resumed run would not continue the same training."""

SECTION_BUILDERS: dict[str, Any] = {}
"""Top-level sections built by a higher layer (name -> function(tree, build) -> section), e.g. the
finetuning section: `register_section` adds them, so this module never imports upwards."""
EXTRA_MUTABLE: list[str] = []
"""Dotted fields of registered sections that a resume may change (beside RESUME_MUTABLE)."""


def register_section(name: str, builder: Any, mutable: Sequence[str] = ()) -> None:
    """A top-level section owned by a higher layer; `mutable`: its fields a resume may change."""
    SECTION_BUILDERS[name] = builder
    EXTRA_MUTABLE.extend(f"{name}.{field}" for field in mutable if f"{name}.{field}" not in EXTRA_MUTABLE)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Validate a nested mapping into a Config (types, ranges, cross-field rules; no file checks)."""
    tree = dict(tree)
    for required in ("data", "model"):
        check(required, None, required in tree, "a section (data and model are required)")
    plugins = tree.get("plugins") or []
    check("plugins", plugins, isinstance(plugins, list) and all(isinstance(p, str) for p in plugins),
          "a list of module names")
    import_plugins(plugins)
    objectives = build_sections(tree.pop("objectives", None), build)
    special = {name: tree.pop(name) for name in list(tree) if name in SECTION_BUILDERS}
    cfg = build(Config, tree)
    cfg.objectives = objectives
    for name, value in special.items():
        setattr(cfg, name, SECTION_BUILDERS[name](value, build))
    check_architecture(cfg)
    check("data.max_text_len", cfg.data.max_text_len, cfg.data.max_text_len <= cfg.model.max_text_len,
          f"at most model.max_text_len={cfg.model.max_text_len}")
    check_objective_inputs(cfg)
    if cfg.train.global_batch_size:
        check("train.global_batch_size", cfg.train.global_batch_size,
              cfg.train.global_batch_size % cfg.train.grad_accumulation == 0,
              f"a multiple of train.grad_accumulation={cfg.train.grad_accumulation}")
    return cfg


def check_architecture(cfg: Config) -> None:
    """What `model.architecture` can train: a dual encoder has no attention across the modalities, so
    ITC is its only objective and IAIS is undefined; `iais.layers` must name layers the architecture
    has (two_stream: co-attention blocks). One ConfigError naming the field, before any process starts."""
    arch = cfg.model.architecture
    if arch == "dual_encoder":
        why = "false for model.architecture=dual_encoder (nothing attends across the modalities"
        check("iais.enabled", cfg.iais.enabled, not cfg.iais.enabled, why + ", so IAIS is undefined)")
        for name, section in term_sections(cfg.objectives).items():
            check(f"objectives.{name}.enabled", section.enabled, name == "itc" or not section.enabled,
                  why + ": ITC is its only objective)")
        return
    if cfg.iais.enabled:
        count = cfg.model.iais_layer_count
        what = f"co-attention blocks (model.cross_layers={count})" if arch == "two_stream" else \
            f"encoder layers (model.num_layers={count})"
        check("iais.layers", cfg.iais.layers, all(-count <= i < count for i in cfg.iais.layers),
              f"indices in [-{count}, {count}) of the {what}")


def check_objective_inputs(cfg: Config) -> None:
    """What the optional objectives need from the data and model sections (no files read)."""
    if cfg.objectives.get("sampling") == "per_batch":
        weights = [section.weight for section in term_sections(cfg.objectives).values() if section.enabled]
        check("objectives.sampling", "per_batch", sum(weights) > 0,
              "joint, or an enabled objective with weight > 0 to draw (per_batch draws by weight)")
    tags = cfg.objectives.get("tags")
    if tags is not None and tags.enabled:
        check("data.max_tag_len", cfg.data.max_tag_len, cfg.data.max_tag_len > 0,
              "an integer > 0 (the object tags' token length) with objectives.tags enabled")
        combined = cfg.data.max_text_len + cfg.data.max_tag_len - 1
        check("data.max_tag_len", cfg.data.max_tag_len, combined <= cfg.model.max_text_len,
              f"at most model.max_text_len - data.max_text_len + 1 = {cfg.model.max_text_len - cfg.data.max_text_len + 1} "
              f"(words and tags share the text positions)")
    position = cfg.objectives.get("position")
    if position is not None and position.enabled:
        check("data.visual", cfg.data.visual, cfg.data.visual == "pixels",
              "pixels with objectives.position enabled (its single-shape views paint over pixels)")
        if cfg.model.visual_embedder == "patch":
            std = cfg.model.visual_position_std or cfg.model.initializer_range
            check("model.visual_position_std", cfg.model.visual_position_std, std >= 1.0,
                  "at least 1.0 with objectives.position enabled (a smaller patch position table drowns in "
                  "the patch content and the position captions stay at chance: set model.visual_position_std=1.0)")


def check_categories(cfg: Config) -> None:
    """MRC, object tags and position captions need box categories: some dataset.json of data.paths
    lists `box_labels`."""
    from data_tools.manifest import category_vocabulary

    mrm, tags, position = (cfg.objectives.get(name) for name in ("mrm", "tags", "position"))
    wants = [name for name, on in (("objectives.mrm.mrc", mrm is not None and mrm.enabled and mrm.mrc),
                                   ("objectives.tags.enabled", tags is not None and tags.enabled),
                                   ("objectives.position.enabled", position is not None and position.enabled)) if on]
    if wants and not category_vocabulary(cfg.data.paths):
        raise ConfigError(wants[0], True, f"false: no dataset of data.paths={cfg.data.paths} carries box categories "
                          f"(box_labels in dataset.json; synthetic and COCO-with-instances builds do)")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML preset, apply the overrides in order, validate (including files on disk)."""
    tree = read_yaml(path) if path else {}
    for override in overrides:
        apply_override(tree, override)
    cfg = config_from_dict(tree)
    check_environment(cfg)
    return cfg


def _is_remote(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def check_environment(cfg: Config) -> None:
    """Checks that need the file system or the hardware: dataset folders and their dataset.json,
    the DeepSpeed JSON, the init checkpoint's vocabulary, fp16."""
    from data_tools.manifest import load_dataset_info

    check("data.paths", cfg.data.paths, len(cfg.data.paths) > 0, "at least one dataset folder")
    for section, paths in (("data.paths", cfg.data.paths), ("eval.paths", cfg.eval.paths)):
        for i, p in enumerate(paths):
            if _is_remote(p):
                continue
            check(f"{section}[{i}]", p, (Path(p) / "dataset.json").is_file(),
                  "an existing dataset folder with dataset.json (build one with `python -m data_tools build`)")
            try:
                load_dataset_info(p)
            except UserError as err:  # present but malformed: the data is wrong, not the configuration
                raise UserError(f"{section}[{i}]: {err}", ExitCode.DATA) from None
    check_categories(cfg)
    if cfg.zero.deepspeed_config is not None:
        p = Path(cfg.zero.deepspeed_config)
        check("zero.deepspeed_config", str(p), p.is_file(), "an existing DeepSpeed JSON file")
        try:
            data = json.loads(p.read_text())
        except ValueError as err:
            raise ConfigError("zero.deepspeed_config", str(p), f"valid JSON ({err})") from None
        check("zero.deepspeed_config", str(p), isinstance(data, dict), "a JSON object")
        adopt_raw_deepspeed(cfg, data)
    if cfg.model.init_from is not None:
        check_init_vocabulary(cfg)
    if cfg.precision == "fp16":
        import torch

        check("precision", "fp16", torch.cuda.is_available(), "fp32 or bf16 on this machine (fp16 needs a CUDA device)")


def check_init_vocabulary(cfg: Config) -> None:
    """`model.init_from` must have been trained with the data tokenizer's vocabulary.

    The model's vocab_size is the tokenizer's size, so a checkpoint whose word embedding table has
    another number of rows cannot load; say so here, before any process group starts. A tokenizer
    that is not a local folder (a remote dataset without data.tokenizer) is left to the loader.
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
        check("zero.deepspeed_config", f"{cfg.zero.deepspeed_config}: zero_optimization.stage={stage!r}",
              stage in (0, 1, 2, 3), "a ZeRO stage 0, 1, 2 or 3")
        cfg.zero.stage = stage
    for precision in ("bf16", "fp16"):
        if (data.get(precision) or {}).get("enabled") is True:
            cfg.precision = precision


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _strip(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.get(key) if isinstance(tree, dict) else None
    if isinstance(tree, dict):
        tree.pop(last, None)


def training_identity(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """The config without the fields a resume may change (RESUME_MUTABLE, EXTRA_MUTABLE)."""
    tree = json.loads(json.dumps(to_dict(cfg) if not isinstance(cfg, dict) else cfg))
    for dotted in (*RESUME_MUTABLE, *EXTRA_MUTABLE):
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


def check_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), checked once before any process group
    starts; UserError when it cannot continue this run: missing, incomplete, or trained with a
    configuration that differs beyond RESUME_MUTABLE."""
    path = resolve_resume(cfg.resume, cfg.run.path)
    if path is None:
        return None
    diffs = resume_differences(read_client_state(path)["config"], cfg)
    if diffs:
        raise UserError(f"resume: {path} was trained with a different configuration; only the world size and "
                        f"the fields in pretrain.config.RESUME_MUTABLE may change: {'; '.join(diffs)}")
    return path
