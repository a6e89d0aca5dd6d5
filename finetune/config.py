"""The `finetune` section of the configuration, and how `python -m finetune` reads a preset.

    cfg = load_finetune_config("configs/tiny.yaml", ["finetune.init=runs/tiny", "train.steps=100"])

A preset's `finetune:` section holds the recipe and `overrides`: dotted settings applied before the
command line's when finetuning (the paper's optimiser values: lr 5e-5, betas (0.9, 0.98), weight
decay 0.01, clip 2.0, 500 warm-up steps of 5000), so one preset file serves both stages. The same
schema validates everything (pretrain.config), before any process group starts: this entry point
declares its section to it (`SECTIONS`), nothing registers itself on import.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from data_tools.errors import UserError, check
from pretrain.config import Config, config_from_dict
from pretrain.preflight import check_environment
from pretrain.config_schema import apply_override, read_yaml

ITM_RECIPES = ("hard_negative", "itc_itm")
"""Recipes that score pairs with ITM (a joint pass): not for model.architecture=dual_encoder."""


@dataclasses.dataclass
class FinetuneConfig:
    """Retrieval finetuning: where it starts, the recipe, hard-negative mining, evaluation."""

    init: str | None = None
    """Start from: a pretraining run directory (newest complete checkpoint), a checkpoint or an export
    folder; None: from model.init_from / fresh weights."""
    recipe: Literal["hard_negative", "itc_itm", "itc"] = "hard_negative"
    """hard_negative (the paper: hinge on sigmoid ITM scores against mined negatives) | itc_itm (ITC + ITM
    with in-batch hard negatives, ALBEF style) | itc (ITC only: the recipe of model.architecture=dual_encoder)."""
    batch_kinds: Literal["alternate", "image", "caption"] = "alternate"
    """hard_negative batches built around an image (its caption + H hard captions) or around a caption (its
    image + H hard images): alternate by optimiser step, or one kind only."""
    mining: Literal["random_n", "itc_topk"] = "random_n"
    """random_n (the paper: N random candidates scored by ITM in eval mode, H hardest kept) | itc_topk (the H
    nearest of N random candidates by ITC embedding: unimodal passes only, cheaper)."""
    candidates: int = 399
    """N: candidates scored per matched pair."""
    hard: int = 31
    """H: hard negatives kept per matched pair."""
    margin: float = 0.2
    """Hinge margin on sigmoid scores."""
    iais_by_batch_kind: bool = True
    """IAIS direction V on image-built batches and L on caption-built ones (the official recipe);
    false: iais.direction."""
    eval_mode: Literal["full", "rerank", "embedding"] = "rerank"
    """Retrieval scoring of the evaluation inside the loop (eval.every_steps, eval.paths)."""
    eval_k: int = 16
    """Candidates per query re-ranked by ITM in rerank mode."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dotted settings applied before the command line's when finetuning (e.g. optimizer.lr: 5.0e-5)."""

    resume_mutable: ClassVar[tuple[str, ...]] = ("init",)
    """Fields a resume may change (pretrain.checkpoint.check_resume): a resumed run has its weights."""

    def __post_init__(self) -> None:
        check("finetune.candidates", self.candidates, self.candidates >= 1, "an integer >= 1")
        check(
            "finetune.hard",
            self.hard,
            1 <= self.hard <= self.candidates,
            f"an integer in [1, finetune.candidates={self.candidates}]",
        )
        check("finetune.margin", self.margin, self.margin >= 0, "a margin >= 0")
        check("finetune.eval_k", self.eval_k, self.eval_k >= 1, "an integer >= 1")


SECTIONS = {"finetune": FinetuneConfig}
"""The top-level sections `python -m finetune` adds to the schema (pretrain.config.config_from_dict)."""


def load_finetune_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """A preset with its `finetune.overrides` applied, then the command line's overrides; validated."""
    tree = read_yaml(path) if path else {}
    section = tree.get("finetune") or {}
    check("finetune", section, isinstance(section, dict), "a mapping of FinetuneConfig fields")
    preset_overrides = section.get("overrides") or {}
    check(
        "finetune.overrides", preset_overrides, isinstance(preset_overrides, dict), "a mapping of dotted keys to values"
    )
    for dotted, value in preset_overrides.items():
        apply_override(tree, f"{dotted}={_yaml_scalar(value)}")
    for override in overrides:
        apply_override(tree, override)
    tree.setdefault("finetune", {})
    cfg = config_from_dict(tree, SECTIONS)
    check_finetune_architecture(cfg)
    check_environment(cfg)
    check_init(cfg)
    return cfg


def check_finetune_architecture(cfg: Config) -> None:
    """A dual encoder has no ITM (nothing attends across the modalities): it finetunes with the `itc`
    recipe and evaluates by embedding."""
    if cfg.model.architecture != "dual_encoder":
        return
    why = "for model.architecture=dual_encoder (no ITM: nothing attends across the modalities)"
    check("finetune.recipe", cfg.finetune.recipe, cfg.finetune.recipe not in ITM_RECIPES, f"itc {why}")
    check("finetune.eval_mode", cfg.finetune.eval_mode, cfg.finetune.eval_mode == "embedding", f"embedding {why}")


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def check_init(cfg: Config) -> None:
    """`finetune.init` must exist and hold weights of this run's model shape (one line otherwise)."""
    init = cfg.finetune.init
    if init is None:
        return
    from pretrain.weights import find_model_weights

    source = find_model_weights(init)
    mine = dataclasses.asdict(cfg.model)
    theirs = dataclasses.asdict(source.model_config)
    ignore = {"vocab_size", "init_from", "dropout", "attention_dropout", "freeze_text"}  # training choices
    diffs = [
        f"{k}: {theirs[k]!r} (weights) vs {mine[k]!r} (config)"
        for k in sorted(mine)
        if k not in ignore and mine[k] != theirs.get(k)
    ]
    if diffs:
        raise UserError(
            f"finetune.init={init}: the weights were trained with another model configuration: {'; '.join(diffs)}"
        )
    if source.tokenizer_dir is not None and cfg.data.tokenizer is None:
        cfg.data.tokenizer = str(Path(source.tokenizer_dir).resolve())
