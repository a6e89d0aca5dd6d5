"""The single-stream encoder: BERT-layout post-LN layers over `[CLS] words [SEP] visual tokens`.

Every layer attends with `torch.nn.functional.scaled_dot_product_attention` (the fused kernel),
without a mask where the keys are known on the host to have no padding (`masks`), else with one
additive [B, 1, 1, L] mask built once per pass.
The layers chosen for IAIS additionally compute, from the same Q and K (no dropout), for the
selected rows only (the matched pairs), the four block-restricted softmaxes of DESIGN.md 1
averaged over heads: `S_LL`, `S_VV`, `S_LV`, `S_VL`. Nothing else materialises attention
probabilities, and the blocks never feed back into the forward pass (the output with IAIS on is the
output with IAIS off).

Submodule names follow Hugging Face's `BertLayer` (`attention.self.query`, `attention.output.dense`,
`intermediate.dense`, `output.LayerNorm`, ...) so BERT checkpoints load by name (`hf_init`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .masks import attention_bias


@dataclasses.dataclass
class AttentionBlocks:
    """Head-averaged block-restricted attention probabilities of one layer, for P selected rows.

    n = padded word count (positions 1 .. Lt-2 of the text), m = padded visual token count. Rows and
    columns of padded words / visual tokens are meaningless and masked by `word_mask` / `visual_mask`;
    every real row sums to 1 over the real columns of its block. Float32 (computed outside autocast).
    """

    s_ll: Tensor  # [P, n, n] words -> words
    s_vv: Tensor  # [P, m, m] visual -> visual
    s_lv: Tensor  # [P, n, m] words -> visual
    s_vl: Tensor  # [P, m, n] visual -> words
    word_mask: Tensor  # [P, n] bool, real words
    visual_mask: Tensor  # [P, m] bool, real visual tokens


@dataclasses.dataclass
class BlockRequest:
    """Which rows the IAIS layers compute blocks for, and where the words and visual tokens are."""

    rows: Tensor  # [P] long, indices of the matched pairs in the batch (index_select: no host sync)
    text_len: int  # Lt: the sequence is [text (Lt) | visual (M)]
    word_mask: Tensor  # [P, n = Lt - 2] bool, for the selected rows
    visual_mask: Tensor  # [P, M] bool, for the selected rows


def key_bias(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask [P, c]: 0 for real keys, the dtype's most negative finite value for padding.

    finfo.min rather than -inf: a row without any real key stays finite (and is masked downstream);
    an added bias rather than masked_fill: cheaper on CPU, and its backward is the identity.
    """
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, torch.finfo(dtype).min
    )


def _masked_softmax(logits: Tensor, bias: Tensor) -> Tensor:
    # logits [P, h, r, c], bias [P, c] (key_bias): softmax over real keys only, masked keys get exactly 0.
    return (logits + bias[:, None, None, :]).softmax(dim=-1)


def attention_blocks(query: Tensor, key: Tensor, request: BlockRequest) -> AttentionBlocks:
    """The four block-restricted softmaxes, averaged over heads, for the selected rows.

    query, key: [P, h, L, d] (already restricted to the selected rows), L = Lt + M.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        dtype = torch.promote_types(query.dtype, torch.float32)
        query, key = query.to(dtype), key.to(dtype)
        scale = query.shape[-1] ** -0.5
        words, visual = slice(1, request.text_len - 1), slice(request.text_len, None)
        q_w, q_v = query[:, :, words] * scale, query[:, :, visual] * scale  # [P, h, n, d], [P, h, m, d]
        k_w, k_v = key[:, :, words], key[:, :, visual]
        word_bias, visual_bias = key_bias(request.word_mask, dtype), key_bias(request.visual_mask, dtype)
        return AttentionBlocks(
            s_ll=_masked_softmax(q_w @ k_w.transpose(-1, -2), word_bias).mean(dim=1),  # [P, n, n]
            s_vv=_masked_softmax(q_v @ k_v.transpose(-1, -2), visual_bias).mean(dim=1),  # [P, m, m]
            s_lv=_masked_softmax(q_w @ k_v.transpose(-1, -2), visual_bias).mean(dim=1),  # [P, n, m]
            s_vl=_masked_softmax(q_v @ k_w.transpose(-1, -2), word_bias).mean(dim=1),  # [P, m, n]
            word_mask=request.word_mask,
            visual_mask=request.visual_mask,
        )


def fused_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
    """`scaled_dot_product_attention` with an additive mask (`attention_bias`) or none.

    query [B, h, Lq, d], key / value [B, h, Lk, d] as `split_heads` gives them: views of [B, L, h, d]
    whose last dimension is contiguous, the layout the flash and memory-efficient kernels read
    (a `.contiguous()` copy would only cost time). The mask follows the query's dtype (autocast)."""
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != query.dtype:
        attn_mask = attn_mask.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, W] -> [B, h, L, W / h]."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, h, L, d] -> [B, L, h * d]."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def head_mean_softmax(query: Tensor, key: Tensor, key_mask: Tensor) -> Tensor:
    """Block-restricted softmax averaged over heads, float32 or wider, outside autocast.

    query [P, h, r, d], key [P, h, c, d], key_mask [P, c] bool -> [P, r, c] (masked keys exactly 0).
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        dtype = torch.promote_types(query.dtype, torch.float32)
        logits = (query.to(dtype) * query.shape[-1] ** -0.5) @ key.to(dtype).transpose(-1, -2)
        return _masked_softmax(logits, key_bias(key_mask, dtype)).mean(dim=1)


class _Projections(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)


class _ResidualOutput(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm (BERT's SelfOutput / Output)."""

    def __init__(self, inner: int, width: int, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(inner, width)
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class _Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self = _Projections(config.width)
        self.output = _ResidualOutput(config.width, config.width, config)


class _Intermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.width, config.intermediate_size)


class EncoderLayer(nn.Module):
    """One post-LN BERT layer with fused attention, optionally also returning IAIS blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.attention_dropout = config.attention_dropout
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _ResidualOutput(config.intermediate_size, config.width, config)

    def attend_with_qk(self, hidden: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention and feed-forward -> (out [B, L, W], query, key [B, h, L, d]); the two-stream
        co-attention blocks read the query and key for their IAIS blocks. attn_mask: `attention_bias`."""
        query, key, value = (
            split_heads(p(hidden), self.num_heads)
            for p in (self.attention.self.query, self.attention.self.key, self.attention.self.value)
        )
        context = fused_attention(
            query, key, value, attn_mask, self.attention_dropout if self.training else 0.0
        )  # [B, h, L, d]
        attended = self.attention.output(merge_heads(context), hidden)
        out = self.output(F.gelu(self.intermediate.dense(attended)), attended)
        return out, query, key

    def forward(
        self, hidden: Tensor, attn_mask: Tensor | None, request: BlockRequest | None = None
    ) -> tuple[Tensor, AttentionBlocks | None]:
        # hidden [B, L, W], attn_mask [B, 1, 1, L] additive (attention_bias) or None (no padding)
        out, query, key = self.attend_with_qk(hidden, attn_mask)
        blocks = None
        if request is not None:
            blocks = attention_blocks(query.index_select(0, request.rows), key.index_select(0, request.rows), request)
        return out, blocks


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s; returns the last hidden states and the IAIS blocks per layer."""

    def __init__(self, config: ModelConfig, num_layers: int | None = None):
        super().__init__()
        count = config.num_layers if num_layers is None else num_layers
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(count))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(
        self,
        hidden: Tensor,
        key_mask: Tensor | None,
        request: BlockRequest | None = None,
        iais_layers: frozenset[int] = frozenset(),
    ) -> tuple[Tensor, dict[int, AttentionBlocks]]:
        # hidden [B, L, W], key_mask [B, L] bool (None, or marked unpadded: attention without a mask)
        attn_mask = attention_bias(key_mask, hidden.dtype)  # [B, 1, 1, L] or None
        attention: dict[int, AttentionBlocks] = {}
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layer):
            layer_request = request if index in iais_layers else None
            if recompute:
                hidden, blocks = checkpoint(layer, hidden, attn_mask, layer_request, use_reentrant=False)
            else:
                hidden, blocks = layer(hidden, attn_mask, layer_request)
            if blocks is not None:
                attention[index] = blocks
        return hidden, attention
