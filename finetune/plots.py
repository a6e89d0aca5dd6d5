"""Attention plots for a few matched pairs, so a person can see whether the relations agree.

One PNG per pair, five panels: the image with its annotated boxes (numbered) and the caption;
S_LL (words -> words) beside P_LL, the pseudo matrix built from S_VV through the word-to-visual
alignment (direction L of `pretrain.iais.pseudo_and_target`); S_VV (visual tokens -> visual
tokens) beside P_VV built from S_LL (direction V). Axes carry the word tokens and the visual token
numbers (patches and grid cells row-major, regions in their stored order). matplotlib with the
Agg backend (no display needed); the PNG bytes are returned and written by `report`.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np
import torch

from pretrain.iais import pseudo_and_target

from .eval_data import EvalSet, collate_samples
from .scoring import model_device, to_device

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def choose_pairs(eval_set: EvalSet, count: int) -> list[int]:
    """Captions to plot: those with at least two phrase links first (relations to compare), in gallery order."""
    linked = [c for c, p in enumerate(eval_set.caption_phrases) if p and len(p) >= 2]
    rest = [c for c in range(len(eval_set.captions)) if c not in set(linked)]
    return (linked + rest)[: max(0, count)]


def _ticks(axis_labels: list[str], ax, rows: bool, cols: bool, every: int = 1) -> None:
    positions = list(range(0, len(axis_labels), every))
    labels = [axis_labels[i] for i in positions]
    if cols:
        ax.set_xticks(positions, labels, rotation=90, fontsize=6)
    if rows:
        ax.set_yticks(positions, labels, fontsize=6)


def _heatmap(ax, matrix: np.ndarray, labels: list[str], title: str, vmax: float) -> None:
    ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-6))
    every = 1 if len(labels) <= 24 else int(np.ceil(len(labels) / 16))
    _ticks(labels, ax, rows=True, cols=True, every=every)
    ax.set_title(title, fontsize=8)


@torch.no_grad()
def pair_figure(
    model,
    eval_set: EvalSet,
    caption: int,
    tokenizer,
    *,
    layer: int,
    max_text_len: int,
    visual: str,
    image_size: int,
    mode: str = "singular",
    normalization: str = "softmax",
) -> bytes:
    """PNG bytes of the five-panel figure for caption `caption` and its image at `layer`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = eval_set.pair_sample(caption)
    batch = to_device(collate_samples([sample], tokenizer, max_text_len, visual, image_size), model_device(model))
    saved = model.iais_layers
    try:
        model.set_iais_layers({layer})
        visual_tokens, visual_mask = model.embed_visual(batch)
        out = model(
            batch["input_ids"],
            batch["text_mask"],
            visual_tokens,
            visual_mask,
            iais_rows=torch.ones(1, dtype=torch.bool, device=visual_tokens.device),
        )
    finally:
        model.iais_layers = saved
    blocks = out.attention[layer]
    pseudo_ll, s_ll, words = pseudo_and_target(blocks, "L", mode, normalization)
    pseudo_vv, s_vv, tokens = pseudo_and_target(blocks, "V", mode, normalization)
    w = words[0].cpu().numpy()
    v = tokens[0].cpu().numpy()
    ids = batch["input_ids"][0, 1 : 1 + len(w)].cpu().tolist()
    word_labels = [t for t, keep in zip(tokenizer.convert_ids_to_tokens(ids), w) if keep]
    token_labels = [str(i) for i in np.flatnonzero(v)]

    def square(x: torch.Tensor, keep: np.ndarray) -> np.ndarray:
        return x[0].float().cpu().numpy()[np.ix_(keep, keep)]

    fig, axes = plt.subplots(1, 5, figsize=(24, 5.4))
    ax = axes[0]
    if sample.get("pixels") is not None:
        ax.imshow(sample["pixels"])
    elif "pixel_values" in batch:
        ax.imshow(
            np.clip(batch["pixel_values"][0].cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN, 0, 1)
        )
    boxes = sample.get("boxes")
    if boxes is not None:
        for n, (x1, y1, x2, y2) in enumerate(np.asarray(boxes).reshape(-1, 4).tolist()):
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="magenta", linewidth=1.5))
            ax.text(x1, y1, str(n), color="magenta", fontsize=8, va="bottom")
    ax.set_title("\n".join(textwrap.wrap(eval_set.captions[caption], 40)), fontsize=8)
    ax.axis("off")
    text_pair = square(s_ll, w), square(pseudo_ll, w)  # one colour scale per compared pair
    visual_pair = square(s_vv, v), square(pseudo_vv, v)
    top_l, top_v = max(float(m.max()) for m in text_pair), max(float(m.max()) for m in visual_pair)
    _heatmap(axes[1], text_pair[0], word_labels, f"S_LL (layer {layer})", top_l)
    _heatmap(axes[2], text_pair[1], word_labels, f"P_LL from S_VV ({mode})", top_l)
    _heatmap(axes[3], visual_pair[0], token_labels, f"S_VV (layer {layer}), visual tokens", top_v)
    _heatmap(axes[4], visual_pair[1], token_labels, f"P_VV from S_LL ({mode})", top_v)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def attention_plots(model, eval_set: EvalSet, tokenizer, *, count: int, layer: int, **kw: Any) -> dict[str, bytes]:
    """{file name: PNG bytes} for `count` pairs (`pair<caption>_layer<layer>.png`)."""
    return {
        f"pair{c:05d}_layer{layer}.png": pair_figure(model, eval_set, c, tokenizer, layer=layer, **kw)
        for c in choose_pairs(eval_set, count)
    }
