"""The one way to load trained weights, for every consumer (finetuning's start, evaluation, the export
round trip), from any of the three places they are kept:

    a run directory      its newest complete checkpoint (`checkpoints/latest`)
    a checkpoint folder  `<run>/checkpoints/<tag>` (DeepSpeed state, any ZeRO stage, + client_state.json)
    an export folder     `python -m pretrain export` (model.safetensors + model_config.json + tokenizer/)

    weights = find_model_weights("runs/tiny")      # ModelWeights: where, which ModelConfig, tokenizer folder
    config, state, tokenizer_dir = load_model_weights("runs/tiny")
    model, tokenizer = load_model("runs/tiny")     # built, weights copied strictly, eval mode

`find_model_weights` reads configurations only (cheap: the checks before a run starts use it); the
tensors are read by `ModelWeights.state_dict`. Loading never unpickles arbitrary objects
(safetensors for exports; DeepSpeed states under `pretrain.export.weights_only_loads`). A path that
is none of the three, or weights that do not fit the model, is one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import torch

from data_tools.errors import ConfigError, UserError
from pretrain.checkpoint import resolve_resume
from pretrain.export import MODEL_CONFIG, TOKENIZER, WEIGHTS, consolidated_state_dict
from pretrain.run_state import CLIENT_STATE, RunState, read_run_state


@dataclasses.dataclass
class ModelWeights:
    """Where a model's weights are and what they were trained as (no tensors read yet)."""

    path: Path
    """The checkpoint or export folder the weights come from."""
    kind: Literal["checkpoint", "export"]
    model_config: Any
    """pretrain.model.ModelConfig, vocab_size included."""
    tokenizer_dir: Path | None
    """The tokenizer the weights were trained with (an export may lack one)."""
    run_state: RunState | None = None
    """The checkpoint's saved run state (None for an export)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's fp32 tensors (objective heads and the engine's `model.` prefix left out)."""
        if self.kind == "export":
            from safetensors.torch import load_file

            return load_file(str(self.path / WEIGHTS))
        return consolidated_state_dict(self.path)


def find_model_weights(source: str | Path) -> ModelWeights:
    """A run directory, a checkpoint folder or an export folder -> ModelWeights."""
    folder = Path(source)
    if (folder / WEIGHTS).is_file() and (folder / MODEL_CONFIG).is_file():
        tokenizer = folder / TOKENIZER
        return ModelWeights(
            folder, "export", _exported_config(folder / MODEL_CONFIG), tokenizer if tokenizer.is_dir() else None
        )
    if not folder.exists():
        raise UserError(f"{folder}: no such run, checkpoint or export folder")
    try:
        checkpoint = resolve_resume(str(folder), folder)
    except UserError:
        checkpoint = None
    if checkpoint is None or not (checkpoint / CLIENT_STATE).is_file():
        raise UserError(
            f"{folder}: not a run directory, checkpoint or export (expected checkpoints/latest, "
            f"{CLIENT_STATE}, or {WEIGHTS} + {MODEL_CONFIG})"
        )
    state = read_run_state(checkpoint)
    tokenizer = checkpoint / TOKENIZER
    if not tokenizer.is_dir():
        raise UserError(f"{checkpoint}: the checkpoint carries no tokenizer/ folder")
    from data_tools.collate import load_tokenizer

    config = state.model_config(vocab_size=len(load_tokenizer(tokenizer)))
    return ModelWeights(checkpoint, "checkpoint", config, tokenizer, state)


def _exported_config(path: Path) -> Any:
    """model_config.json -> ModelConfig, validated by the schema like a configured one."""
    from pretrain.config_schema import build
    from pretrain.model import ModelConfig

    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(tree, dict):
            raise ValueError("not a JSON object")
        return build(ModelConfig, tree, "model")
    except (ValueError, ConfigError) as err:
        raise UserError(f"{path}: not a model configuration ({err})") from None


def load_model_weights(source: str | Path) -> tuple[Any, dict[str, torch.Tensor], Path | None]:
    """(ModelConfig, state dict, tokenizer folder or None) of a run, checkpoint or export."""
    weights = find_model_weights(source)
    return weights.model_config, weights.state_dict(), weights.tokenizer_dir


def copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy `state` into `model` strictly: every tensor present, every shape equal, or one line naming
    the first difference (weights trained with another model configuration)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [n for n in sorted(set(own) & set(state)) if own[n].shape != state[n].shape]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
            if unexpected
            else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model expects {tuple(own[wrong[0]].shape)}"
        )
        raise UserError(
            f"{source}: the weights do not match the model configuration ({detail}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape)"
        )
    model.load_state_dict(state, strict=True)


def load_model(source: str | Path | ModelWeights) -> tuple[torch.nn.Module, Any]:
    """(the model with the weights of `source`, in eval mode; its tokenizer or None)."""
    from data_tools.collate import load_tokenizer
    from pretrain.model import build_model

    weights = source if isinstance(source, ModelWeights) else find_model_weights(source)
    model = build_model(weights.model_config)
    copy_weights(model, weights.state_dict(), weights.path)
    tokenizer = load_tokenizer(weights.tokenizer_dir) if weights.tokenizer_dir is not None else None
    return model.eval(), tokenizer
