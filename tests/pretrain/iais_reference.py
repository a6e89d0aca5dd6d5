"""A plain reference of DESIGN.md 1, one sample at a time, with loops and no vectorisation.

Written straight from the text (not from pretrain/iais.py) so that the vectorised implementation
can be checked against it: block softmaxes from one sample's Q and K over its real tokens only,
the pseudo matrix entry by entry, torch's own `kl_div(reduction="batchmean")`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_blocks(query: torch.Tensor, key: torch.Tensor, words: int, visual: int, text_len: int):
    """One sample: query, key [h, L, d] -> S_LL [n, n], S_VV [m, m], S_LV [n, m], S_VL [m, n] (real tokens only).

    Words are positions 1..words, visual tokens positions text_len..text_len+visual-1.
    """
    word_pos = list(range(1, 1 + words))
    vis_pos = list(range(text_len, text_len + visual))
    scale = query.shape[-1] ** -0.5
    heads = query.shape[0]

    def block(rows, cols):
        per_head = []
        for h in range(heads):
            logits = torch.stack([torch.stack([(query[h, i] * key[h, j]).sum() * scale for j in cols]) for i in rows])
            per_head.append(torch.softmax(logits, dim=-1))
        return torch.stack(per_head).mean(dim=0)

    return block(word_pos, word_pos), block(vis_pos, vis_pos), block(word_pos, vis_pos), block(vis_pos, word_pos)


def reference_pseudo(s_ll, s_vv, s_lv, s_vl, direction: str, mode: str, normalization: str):
    """The pseudo matrix and the attention it is compared with, for one sample."""
    if direction == "L":
        cross, back, other_self, target = s_lv, s_vl, s_vv, s_ll
    else:
        cross, back, other_self, target = s_vl, s_lv, s_ll, s_vv
    size = target.shape[0]
    if mode == "distributed":
        return cross @ back, target
    aligned = [int(torch.argmax(cross[i])) for i in range(size)]  # r(i) / c(j), moved to the host
    rows = []
    for i in range(size):
        row = torch.stack([other_self[aligned[i], aligned[k]] for k in range(size)])
        if normalization == "softmax":
            row = torch.softmax(row, dim=0)
        else:
            row = row / row.sum()
        rows.append(row)
    return torch.stack(rows), target


def reference_pair_loss(s_ll, s_vv, s_lv, s_vl, direction: str, mode: str, normalization: str):
    """KL(P || S) + KL(S || P) with kl_div batchmean; the logged side as DESIGN.md 1 says."""
    pseudo, attention = reference_pseudo(s_ll, s_vv, s_lv, s_vl, direction, mode, normalization)
    if mode == "distributed":

        def log_input(x):
            return torch.log(x + 1e-6)
    else:

        def log_input(x):
            return torch.log(x.clamp_min(1e-30))

    return F.kl_div(log_input(attention), pseudo, reduction="batchmean") + F.kl_div(
        log_input(pseudo), attention, reduction="batchmean"
    )


def reference_loss(query, key, words, visual, text_len, direction, mode, normalization):
    """Mean over pairs of the per-pair loss; query, key [P, h, L, d]; words, visual: lists of real counts."""
    losses = []
    for p in range(query.shape[0]):
        if words[p] == 0 or visual[p] == 0:
            continue
        blocks = reference_blocks(query[p], key[p], words[p], visual[p], text_len)
        losses.append(reference_pair_loss(*blocks, direction, mode, normalization))
    return torch.stack(losses).mean()
