"""The two-stream architecture (ViLBERT / LXMERT style): `model.architecture=two_stream`.

    text   [CLS] words [SEP] -> encoder (num_layers BERT layers)        -+-> co-attention block -> text out
    visual tokens            -> visual_encoder (num_layers BERT layers) -+   x cross_layers     -> visual out

A co-attention block (LXMERT's cross-modality layer) first lets each stream's queries attend to the
keys and values of the other stream's block input (`text_cross`, `visual_cross`), then runs each
stream's own self-attention and feed-forward (`text_layer`, `visual_layer`, BERT layers). The text
stream keeps BERT's names (`embeddings`, `encoder`), so `model.init_from` loads it as in the
single-stream model. ITC reads the streams before the first block (unimodal by construction), ITM
the pooled outputs of both streams (their product, as ViLBERT), MLM the text stream's output.

IAIS at a block (our extension, DESIGN.md 1 *Other architectures*): `S_LL` and `S_VV` from the
block's two self-attentions, `S_LV` from the text-to-visual cross-attention, `S_VL` from the
visual-to-text one; real words (positions 1..Lt-2) and real visual tokens, head mean, matched rows
only. Every block is row-stochastic over its own keys, so `pretrain.iais` applies unchanged;
`iais.layers` indexes the co-attention blocks. Attention itself is always the fused kernel, without a
mask over keys known to have no padding (`masks`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .encoder import (
    AttentionBlocks,
    BlockRequest,
    Encoder,
    EncoderLayer,
    _Projections,
    _ResidualOutput,
    fused_attention,
    head_mean_softmax,
    merge_heads,
    split_heads,
)
from .masks import attention_bias
from .heads import MLMHead, masked_mean
from .model import EncoderOutput, ModelBase, block_request


class CrossAttention(nn.Module):
    """Queries of one stream attend to the keys and values of the other; BERT's output (dense,
    dropout, residual, LayerNorm) on the querying stream."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.attention_dropout = config.num_heads, config.attention_dropout
        self.self = _Projections(config.width)
        self.output = _ResidualOutput(config.width, config.width, config)

    def forward(self, hidden: Tensor, other: Tensor, other_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        # hidden [B, Lq, W], other [B, Lk, W], other_mask [B, 1, 1, Lk] (attention_bias, None: no padding)
        # -> (out [B, Lq, W], query, key [B, h, L, d])
        query = split_heads(self.self.query(hidden), self.num_heads)
        key = split_heads(self.self.key(other), self.num_heads)
        value = split_heads(self.self.value(other), self.num_heads)
        context = fused_attention(query, key, value, other_mask, self.attention_dropout if self.training else 0.0)
        return self.output(merge_heads(context), hidden), query, key


class CoAttentionBlock(nn.Module):
    """Cross-attention both ways, then each stream's self-attention and feed-forward."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.text_cross = CrossAttention(config)
        self.visual_cross = CrossAttention(config)
        self.text_layer = EncoderLayer(config)
        self.visual_layer = EncoderLayer(config)

    def forward(
        self, text: Tensor, visual: Tensor, text_mask: Tensor, visual_mask: Tensor, request: BlockRequest | None = None
    ) -> tuple[Tensor, Tensor, AttentionBlocks | None]:
        # text [B, Lt, W], visual [B, M, W]; masks [B, 1, 1, Lt] / [B, 1, 1, M] (attention_bias) or None
        text_x, q_text_cross, k_visual_cross = self.text_cross(text, visual, visual_mask)
        visual_x, q_visual_cross, k_text_cross = self.visual_cross(visual, text, text_mask)
        text_out, q_text, k_text = self.text_layer.attend_with_qk(text_x, text_mask)
        visual_out, q_visual, k_visual = self.visual_layer.attend_with_qk(visual_x, visual_mask)
        if request is None:
            return text_out, visual_out, None
        words = slice(1, request.text_len - 1)

        def rows(x: Tensor) -> Tensor:  # [B, h, L, d] -> [P, h, L, d]
            return x.index_select(0, request.rows)

        blocks = AttentionBlocks(
            s_ll=head_mean_softmax(rows(q_text)[:, :, words], rows(k_text)[:, :, words], request.word_mask),
            s_vv=head_mean_softmax(rows(q_visual), rows(k_visual), request.visual_mask),
            s_lv=head_mean_softmax(rows(q_text_cross)[:, :, words], rows(k_visual_cross), request.visual_mask),
            s_vl=head_mean_softmax(rows(q_visual_cross), rows(k_text_cross)[:, :, words], request.word_mask),
            word_mask=request.word_mask,
            visual_mask=request.visual_mask,
        )
        return text_out, visual_out, blocks


class TwoStreamITMHead(nn.Module):
    """Matched / not matched from the product of the pooled streams (ViLBERT): the text's [CLS]
    (`pooler.dense`, BERT's pooler name) and the mean of the real visual tokens, each dense + tanh."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(config.width, config.width)
        self.visual_pooler = nn.Linear(config.width, config.width)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.width, 2)

    def forward(self, text_cls: Tensor, visual_pooled: Tensor) -> Tensor:
        # [B, W], [B, W] -> [B, 2]
        joint = torch.tanh(self.pooler.dense(text_cls)) * torch.tanh(self.visual_pooler(visual_pooled))
        return self.classifier(self.dropout(joint))


class TwoStreamModel(ModelBase):
    """Text stream, visual stream, co-attention blocks; the interface of RelAlignModel."""

    def _build_body(self, config: ModelConfig) -> None:
        self.visual_encoder = Encoder(config)
        self.co_blocks = nn.ModuleList(CoAttentionBlock(config) for _ in range(config.cross_layers))
        self.itm = TwoStreamITMHead(config)
        self.mlm = MLMHead(config)

    def forward(
        self,
        input_ids: Tensor,
        text_mask: Tensor,
        visual_tokens: Tensor,
        visual_mask: Tensor,
        iais_rows: Tensor | None = None,
    ) -> EncoderOutput:
        """Both streams, then the co-attention blocks; hidden = [text out | visual out] [B, Lt + M, W].

        iais_rows: rows whose IAIS blocks the blocks in `iais_layers` compute ([P] long or a bool mask,
        see `block_request`); None: none.
        """
        text_len = input_ids.shape[1]
        text, _ = self.encoder(self.embeddings(input_ids), text_mask.bool())  # [B, Lt, W]
        visual, _ = self.visual_encoder(
            visual_tokens.to(self.embeddings.LayerNorm.weight.dtype), visual_mask.bool()
        )  # [B, M, W]
        text_attn, visual_attn = attention_bias(text_mask, text.dtype), attention_bias(visual_mask, visual.dtype)
        request = block_request(iais_rows, text_mask, visual_mask, self.iais_layers, text.device)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        attention: dict[int, AttentionBlocks] = {}
        for index, block in enumerate(self.co_blocks):
            block_req = request if index in self.iais_layers else None
            if recompute:
                text, visual, blocks = checkpoint(
                    block, text, visual, text_attn, visual_attn, block_req, use_reentrant=False
                )
            else:
                text, visual, blocks = block(text, visual, text_attn, visual_attn, block_req)
            if blocks is not None:
                attention[index] = blocks
        return EncoderOutput(
            hidden=torch.cat([text, visual], dim=1),
            text_len=text_len,
            attention=attention,
            visual_mask=visual_mask.bool(),
        )

    def itm_logits(self, out: EncoderOutput) -> Tensor:
        """[B, 2] from the text [CLS] and the mean of the real visual outputs."""
        visual = masked_mean(out.hidden[:, out.text_len :], out.visual_mask)  # [B, W]
        return self.itm(out.hidden[:, 0], visual)

    def encode_image(self, visual_tokens: Tensor, visual_mask: Tensor) -> Tensor:
        """The visual stream before the co-attention blocks -> [B, E] L2-normalised."""
        hidden, _ = self.visual_encoder(visual_tokens, visual_mask.bool())
        return self.itc.image(hidden, visual_mask.bool())
