"""Key masks known on the host to have no padding, and the attention mask the fused kernel gets.

Why: `scaled_dot_product_attention` with any `attn_mask` cannot use the flash kernel, and a boolean
[B, 1, 1, L] mask is turned into a float one inside every call. Whether a mask is all True is a value
on the device, and reading it would stop the host; but it is often known on the host before the step:
the patch and grid embedders give every image the same tokens (their visual mask is all True by
construction), and the loader says whether any caption of a batch is padded (`text_unpadded`). Such
masks are marked here when they are made; an attention over keys whose mask is marked gets no mask.

A mark is a hint about one tensor object, kept in a weak table: a mask derived from marked masks is
marked only where `cat_masks` / `take_rows` made it, and an unmarked mask takes the masked path, which
gives the same values (slower). A marked mask must not be changed in place.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_UNPADDED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def mark_unpadded(mask: Tensor) -> Tensor:
    """Record that `mask` (bool) is all True, known on the host; returns it."""
    _UNPADDED[mask] = True
    return mask


def is_unpadded(mask: Tensor | None) -> bool:
    """Whether `mask` is known on the host to be all True (None: no mask at all)."""
    return mask is None or mask in _UNPADDED


def unpadded_mask(shape: Sequence[int], device: torch.device) -> Tensor:
    """An all-True bool mask of `shape`, marked."""
    return mark_unpadded(torch.ones(tuple(shape), dtype=torch.bool, device=device))


def cat_masks(masks: Sequence[Tensor], dim: int = 0) -> Tensor:
    """torch.cat of bool masks, marked when every part is."""
    out = torch.cat([m.bool() for m in masks], dim=dim)
    return mark_unpadded(out) if all(is_unpadded(m) for m in masks) else out


def take_rows(mask: Tensor, index: Tensor) -> Tensor:
    """mask[index] for a long index along dim 0, marked when `mask` is."""
    out = mask[index]
    return mark_unpadded(out) if is_unpadded(mask) else out


def attention_bias(key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The `attn_mask` of the fused kernel for key_mask [B, L] bool: None when it is known to have no
    padding, else an additive [B, 1, 1, L] in `dtype` (0 for real keys, the dtype's most negative value
    for padding), built once per pass rather than converted from bool in every layer.

    A row without any real key (an image-only pass over a padding slot) sees its first position: the
    kernel would return NaN for it (such rows are masked downstream)."""
    if is_unpadded(key_mask):
        return None
    key_mask = key_mask.bool().clone()
    key_mask[:, 0] |= ~key_mask.any(dim=1)
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, torch.finfo(dtype).min
    )
    return bias[:, None, None, :]  # [B, 1, 1, L]
