"""`model.freeze_text`: which part of the text tower stays fixed while the rest trains.

Why a flag on parameters and not an optimizer filter: a parameter with `requires_grad` False gets no
gradient, so backward skips the frozen tower's weight gradients and every optimizer (DeepSpeed's
included, built from `pretrain.engine.param_groups`, which leaves such parameters out) never moves
it. Applied by `build_model`, so a resumed run freezes the same parameters as the fresh one.
"""

from __future__ import annotations

from torch import nn


def frozen_modules(model: nn.Module, spec: str | int) -> list[nn.Module]:
    """The modules `spec` (ModelConfig.freeze_text) freezes: the text embeddings, then the lowest
    encoder layers (`all`: every one)."""
    if spec == "none":
        return []
    layers = list(model.encoder.layer)
    count = {"embeddings": 0, "all": len(layers)}.get(spec, spec)
    return [model.embeddings, *layers[:count]]


def freeze_text(model: nn.Module, spec: str | int) -> list[str]:
    """Freeze what `spec` names; returns the frozen parameter names (for logs and tests)."""
    frozen = {id(p) for module in frozen_modules(model, spec) for p in module.parameters()}
    names = []
    for name, param in model.named_parameters():
        if id(param) in frozen:
            param.requires_grad_(False)
            names.append(name)
    return names
