"""Task heads on the encoder: ITM (pooled [CLS]), MLM (decoder tied to the word embeddings), ITC.

Names follow Hugging Face BERT (`pooler.dense`, `cls.predictions.transform`) where a checkpoint
may carry them, so `hf_init` can load them too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class ITMHead(nn.Module):
    """Matched / not matched from BERT's pooled [CLS] (dense + tanh), logits [B, 2]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(config.width, config.width)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.width, 2)

    def forward(self, hidden: Tensor) -> Tensor:
        # hidden [B, L, W] -> [B, 2]
        pooled = torch.tanh(self.pooler.dense(hidden[:, 0]))
        return self.classifier(self.dropout(pooled))


class MLMHead(nn.Module):
    """BERT's LM prediction head; the decoder matrix is the word embedding table (tied)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.width, config.width)
        self.transform.LayerNorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        # hidden [..., W], word_embeddings [V, W] -> [..., V]
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(hidden)))
        return F.linear(x, word_embeddings, self.bias)


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real tokens: hidden [B, L, W], mask [B, L] -> [B, W] (all-MiniLM's pooling)."""
    weights = mask.to(hidden.dtype)[..., None]  # [B, L, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class ContrastiveHead(nn.Module):
    """ITC: unimodal pooled states -> projected, L2-normalised embeddings [B, E]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.text_proj = nn.Linear(config.width, config.embed_dim)
        self.image_proj = nn.Linear(config.width, config.embed_dim)

    def text(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return F.normalize(self.text_proj(masked_mean(hidden, mask)), dim=-1)

    def image(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return F.normalize(self.image_proj(masked_mean(hidden, mask)), dim=-1)
