"""Text embeddings in BERT's layout (word + position + token type, LayerNorm, dropout).

Parameter names follow Hugging Face's `BertEmbeddings` (`word_embeddings`, `position_embeddings`,
`token_type_embeddings`, `LayerNorm`) so that a BERT-family checkpoint maps onto them by name
(`hf_init`). The token-type table also provides the visual type (index 1) that `RelAlignModel`
adds to every visual token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig

TEXT_TYPE = 0
VISUAL_TYPE = 1


class TextEmbeddings(nn.Module):
    """`[CLS] words [SEP] pad` ids -> token vectors."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.vocab_size is not None, "ModelConfig.vocab_size must be set from the tokenizer"
        self.word_embeddings = nn.Embedding(config.vocab_size, config.width)
        self.position_embeddings = nn.Embedding(config.max_text_len, config.width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.width)
        self.LayerNorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        # input_ids [B, Lt] -> [B, Lt, W]
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            # A developer error: the loader truncates captions to model.max_text_len.
            raise ValueError(
                f"text length {length} exceeds model.max_text_len={self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(length, device=input_ids.device)
        embedded = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[TEXT_TYPE]
        )
        return self.dropout(self.LayerNorm(embedded))

    def visual_type(self) -> Tensor:
        """The visual token-type vector [W], added to every visual token."""
        return self.token_type_embeddings.weight[VISUAL_TYPE]
