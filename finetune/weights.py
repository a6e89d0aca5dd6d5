"""Where finetuning and evaluation start from: a run directory (its newest complete checkpoint), a
checkpoint folder, or an export folder (`python -m pretrain export`).

    source = resolve_weights("runs/tiny")      # WeightsSource: model config, tokenizer folder, loader
    model = source.build_model()               # the model (any architecture) with the weights, eval mode

Loading never unpickles arbitrary objects (safetensors for exports; DeepSpeed states under
`pretrain.export.weights_only_loads`). A path that is none of the three is one line, exit 2.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from data_tools.errors import UserError
from pretrain.checkpoint import CLIENT_STATE, read_client_state, resolve_resume
from pretrain.export import MODEL_CONFIG, TOKENIZER, WEIGHTS, consolidated_state_dict


@dataclasses.dataclass
class WeightsSource:
    path: Path
    """The checkpoint or export folder the weights come from."""
    model_config: Any
    """pretrain.model.ModelConfig, vocab_size included."""
    tokenizer_folder: Path | None
    kind: str
    """"checkpoint" | "export"."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.kind == "export":
            from safetensors.torch import load_file

            return load_file(str(self.path / WEIGHTS))
        return consolidated_state_dict(self.path)

    def build_model(self) -> torch.nn.Module:
        """The model with these weights, in eval mode; a mismatch with the config is one line."""
        from pretrain.model import build_model

        model = build_model(self.model_config)
        load_weights(model, self.state_dict(), self.path)
        return model.eval()


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into `model` strictly: every tensor present, every shape equal, or one line naming
    the first difference (weights trained with another model configuration)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [n for n in sorted(set(own) & set(state)) if own[n].shape != state[n].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                  else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model expects {tuple(own[wrong[0]].shape)}")
        raise UserError(f"{source}: the weights do not match the model configuration ({detail}; "
                        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape)")
    model.load_state_dict(state, strict=True)


def resolve_weights(path: str | Path) -> WeightsSource:
    """A run directory, a checkpoint folder or an export folder -> WeightsSource."""
    from pretrain.config_schema import build
    from pretrain.model import ModelConfig

    folder = Path(path)
    if (folder / WEIGHTS).is_file() and (folder / MODEL_CONFIG).is_file():
        try:
            config = ModelConfig(**json.loads((folder / MODEL_CONFIG).read_text()))
        except (ValueError, TypeError) as err:
            raise UserError(f"{folder / MODEL_CONFIG}: not a model configuration ({err})") from None
        tokenizer = folder / TOKENIZER
        return WeightsSource(folder, config, tokenizer if tokenizer.is_dir() else None, "export")
    if not folder.exists():
        raise UserError(f"{folder}: no such run, checkpoint or export folder")
    try:
        checkpoint = resolve_resume(str(folder), folder)
    except UserError:
        checkpoint = None
    if checkpoint is None or not (checkpoint / CLIENT_STATE).is_file():
        raise UserError(f"{folder}: not a run directory, checkpoint or export (expected checkpoints/latest, "
                        f"{CLIENT_STATE}, or {WEIGHTS} + {MODEL_CONFIG})")
    client = read_client_state(checkpoint)
    model_tree = dict(client["config"]["model"])
    tokenizer = checkpoint / TOKENIZER
    if not tokenizer.is_dir():
        raise UserError(f"{checkpoint}: the checkpoint carries no tokenizer/ folder")
    from data_tools.collate import load_tokenizer

    model_tree["vocab_size"] = len(load_tokenizer(tokenizer))
    return WeightsSource(checkpoint, build(ModelConfig, model_tree, "model"), tokenizer, "checkpoint")
