"""ISD per direction and ISDa over an evaluation set's matched pairs, for any set of layers.

The metrics themselves are `pretrain.isd.measure_isd` / `measure_isda` (DESIGN.md 1; ISDa's
definition is ours). This module feeds them eval batches of matched (image, caption) pairs and
measures each requested layer on its own (`model.set_iais_layers({layer})`), so the report shows
where in the encoder relations agree; the set's value is the mean over its layers (what
`measure_isd` returns for the whole set). The model's own IAIS layers are restored afterwards.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from pretrain.isd import measure_isd, measure_isda

from .eval_data import EvalSet, collate_samples
from .scoring import model_device, to_device


def resolve_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """Layer indices (negative from the end; None -> the last) -> sorted non-negative ones
    (ValueError if out of range)."""
    resolved = []
    for index in layers if layers else [-1]:
        layer = index + num_layers if index < 0 else index
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {index} is outside [-{num_layers}, {num_layers})")
        resolved.append(layer)
    return sorted(set(resolved))


def pair_batches(
    eval_set: EvalSet,
    tokenizer,
    *,
    max_text_len: int,
    visual: str,
    image_size: int,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Collated matched pairs (every caption with its image), in gallery order."""
    count = len(eval_set.captions) if limit is None else min(limit, len(eval_set.captions))
    for lo in range(0, count, batch_size):
        samples = [eval_set.pair_sample(c) for c in range(lo, min(lo + batch_size, count))]
        yield to_device(collate_samples(samples, tokenizer, max_text_len, visual, image_size), device)


@torch.no_grad()
def measure(
    model,
    eval_set: EvalSet,
    tokenizer,
    *,
    layers: list[int],
    max_text_len: int,
    visual: str,
    image_size: int,
    batch_size: int = 64,
    mode: str = "singular",
    normalization: str = "softmax",
    limit: int | None = None,
) -> dict[str, Any]:
    """{"layers": {layer: {"L", "V", "isda", "pairs", "isda_pairs"}}, "L", "V", "isda" (means over layers)}.

    `isda` is None when no pair has two or more phrase-to-box links (no annotations to compare).
    """
    saved = model.iais_layers
    device = model_device(model)
    per_layer: dict[int, dict[str, Any]] = {}

    def batches():
        return pair_batches(
            eval_set,
            tokenizer,
            max_text_len=max_text_len,
            visual=visual,
            image_size=image_size,
            batch_size=batch_size,
            device=device,
            limit=limit,
        )

    try:
        for layer in layers:
            model.set_iais_layers({layer})
            isd = measure_isd(model, batches(), mode=mode, normalization=normalization)
            isda = measure_isda(model, batches())
            per_layer[layer] = {
                "L": isd["L"],
                "V": isd["V"],
                "pairs": isd["pairs"],
                "isda": isda["isda"] if isda["pairs"] else None,
                "isda_pairs": isda["pairs"],
            }
    finally:
        model.iais_layers = saved

    def mean(key: str) -> float | None:
        values = [v[key] for v in per_layer.values() if v[key] is not None]
        return sum(values) / len(values) if values else None

    return {
        "layers": per_layer,
        "L": mean("L"),
        "V": mean("V"),
        "isda": mean("isda"),
        "mode": mode,
        "normalization": normalization,
    }
