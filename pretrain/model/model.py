"""`ModelBase` (what every architecture shares) and `RelAlignModel`: text embeddings + visual
embedder + single-stream encoder + ITM/MLM/ITC heads (`model.architecture=single_stream`).

The interface every architecture offers (two_stream.py, dual_encoder.py): `embed_visual`,
`embed_visual_with_boxes`, `forward` -> `EncoderOutput`, `itm_logits`, `mlm_logits`, `encode_text`,
`encode_image`, `itc_scale`, `set_iais_layers` / `iais_layers`, `config`, `embeddings`.
The trainer calls `embed_visual(batch)` then `forward(...)` with `iais_rows` = the matched pairs,
and reads heads from the returned `EncoderOutput`. Which layers return IAIS attention blocks is set
once with `set_iais_layers(regularizer.layers)` (default: the last layer, the official choice).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
from torch import Tensor, nn

from data_tools.errors import ConfigError, UserError

from .config import ModelConfig
from .embeddings import TextEmbeddings
from .encoder import AttentionBlocks, BlockRequest, Encoder
from .heads import ContrastiveHead, ITMHead, MLMHead
from .masks import cat_masks
from .visual import build_visual_embedder


@dataclasses.dataclass
class EncoderOutput:
    hidden: Tensor  # [B, Lt + M, W]
    text_len: int  # Lt: hidden[:, :Lt] is the text, hidden[:, Lt:] the visual tokens
    attention: dict[int, AttentionBlocks]  # layer index (two_stream: co-attention block) -> blocks for the iais_rows
    visual_mask: Tensor | None = None  # [B, M] bool; set by two_stream (its ITM pools the visual stream)


def word_mask_from_text_mask(text_mask: Tensor) -> Tensor:
    """Real words of `[CLS] w1..wn [SEP] pad`: text_mask without position 0 and the last real one.

    text_mask [B, Lt] bool -> [B, Lt] bool (the same as the batch's `word_mask`).
    """
    positions = torch.arange(text_mask.shape[1], device=text_mask.device)[None]  # [1, Lt]
    last = text_mask.long().sum(dim=1, keepdim=True) - 1  # [B, 1], the [SEP]
    return text_mask & (positions >= 1) & (positions < last)


def block_request(
    iais_rows: Tensor | None, text_mask: Tensor, visual_mask: Tensor, iais_layers: frozenset[int], device: torch.device
) -> BlockRequest | None:
    """What the IAIS layers compute blocks for (None: nothing to compute).

    iais_rows: the matched pairs, [P] long row indices (the loader's `sample_rows`: no host read) or a
    bool mask over the first rows (turned into indices here: a host read when it lives on a GPU);
    text_mask [B, Lt], visual_mask [B, M].
    """
    text_len = text_mask.shape[1]
    if iais_rows is None or not iais_layers or visual_mask.shape[1] == 0 or text_len <= 2:
        return None
    if iais_rows.dtype == torch.bool:
        iais_rows = iais_rows.nonzero().flatten()
    rows = iais_rows.to(device, non_blocking=True)  # [P]
    words = word_mask_from_text_mask(text_mask.bool())[:, 1 : text_len - 1]  # [B, n]
    return BlockRequest(
        rows=rows,
        text_len=text_len,
        word_mask=words.index_select(0, rows),
        visual_mask=visual_mask.bool().index_select(0, rows),
    )


class ModelBase(nn.Module):
    """What every architecture shares: text embeddings, the visual embedder, the text encoder
    (`encoder`: BERT names, so `hf_init` loads it), ITC projections and temperature, initialisation,
    IAIS layer selection. A subclass builds its own body (`_build_body`) between the visual embedder
    and the ITC head, so the single-stream model's parameters are created (and initialised) in the
    same order as before the architectures existed."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ConfigError("model.vocab_size", None, "the tokenizer's vocabulary size (set by the caller)")
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.visual = build_visual_embedder(config)
        self.visual_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.visual_dropout = nn.Dropout(config.dropout)
        self.encoder = Encoder(config)
        self._build_body(config)
        self.itc = ContrastiveHead(config)
        # Shape [1], not 0-dim: DeepSpeed 0.19.8 broadcasts parameters as `p.data.view(torch.uint8)`,
        # which raises for a 0-dim tensor; [1] broadcasts against [B, B] similarities the same way.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / config.itc_temperature)))  # [1]
        self._init_fresh_weights()
        count = config.iais_layer_count
        self.iais_layers: frozenset[int] = frozenset({count - 1}) if count else frozenset()

    def _build_body(self, config: ModelConfig) -> None:
        raise NotImplementedError

    def _init_fresh_weights(self) -> None:
        """BERT initialisation for everything except a pretrained visual backbone."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if name.startswith("visual.backbone"):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_iais_layers(self, layers: Iterable[int]) -> None:
        """The layers that return attention blocks (non-negative indices, e.g. `IAISRegularizer.layers`)."""
        layers = frozenset(int(i) for i in layers)
        count = self.config.iais_layer_count
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            what = {
                "two_stream": "co-attention block",
                "dual_encoder": "(none: no attention crosses the modalities)",
            }.get(self.config.architecture, "layer")
            raise ConfigError("iais.layers", sorted(bad), f"{what} indices in [0, {count})")
        self.iais_layers = layers

    def embed_visual_with_boxes(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Visual tokens [B, M, W], visual_mask [B, M] bool, token boxes [B, M, 4] (see `visual`)."""
        tokens, mask, boxes = self.visual(batch)
        if tokens.shape[1] > self.config.max_visual_tokens:
            raise UserError(
                f"{tokens.shape[1]} visual tokens per sample exceed model.max_visual_tokens="
                f"{self.config.max_visual_tokens}: raise it or use smaller images / fewer regions"
            )
        tokens = self.visual_dropout(self.visual_norm(tokens + self.embeddings.visual_type()))
        return tokens, mask, boxes

    def embed_visual(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Visual tokens [B, M, W] (embedded, before the encoder) and visual_mask [B, M] bool."""
        tokens, mask, _ = self.embed_visual_with_boxes(batch)
        return tokens, mask

    def itc_scale(self) -> Tensor:
        """exp(logit_scale) clamped to model.itc_max_scale, shape [1]: multiply cosine similarities by it."""
        return self.logit_scale.clamp(max=math.log(self.config.itc_max_scale)).exp()

    def encode_text(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Text-only pass through `encoder` -> [B, E] L2-normalised (masked mean pooling)."""
        hidden, _ = self.encoder(self.embeddings(input_ids), text_mask.bool())
        return self.itc.text(hidden, text_mask.bool())

    def mlm_logits(self, out: EncoderOutput, positions: Tensor | None = None) -> Tensor:
        """Vocabulary logits over the text tokens [B, Lt, V]; with `positions` only at those positions:
        [N, V] (saves the V-wide matmul elsewhere). positions: [B, Lt] bool (e.g. `mlm_labels != -100`;
        a host read on a GPU) or [N] long flat indices into [B * Lt] (the loader's `mlm_positions`)."""
        text = out.hidden[:, : out.text_len]  # [B, Lt, W]
        if positions is not None and positions.dtype == torch.bool:
            text = text[positions]  # [N, W]
        elif positions is not None:
            text = text.reshape(-1, text.shape[-1]).index_select(0, positions)  # [N, W], same order
        return self.mlm(text, self.embeddings.word_embeddings.weight)


class RelAlignModel(ModelBase):
    """Single-stream image-text transformer with the heads used by pretraining and retrieval."""

    def _build_body(self, config: ModelConfig) -> None:
        self.itm = ITMHead(config)
        self.mlm = MLMHead(config)

    def forward(
        self,
        input_ids: Tensor,
        text_mask: Tensor,
        visual_tokens: Tensor,
        visual_mask: Tensor,
        iais_rows: Tensor | None = None,
    ) -> EncoderOutput:
        """Joint pass over `[CLS] words [SEP] | visual tokens`.

        input_ids, text_mask [B, Lt]; visual_tokens [B, M, W]; visual_mask [B, M];
        iais_rows: rows (matched pairs) whose IAIS blocks are computed, [P] long or a bool mask; None: none.
        iais_rows as long row indices (the batch's `sample_rows`) need no host read; a bool mask on a
        GPU does (see `block_request`).
        """
        text_len = input_ids.shape[1]
        hidden = torch.cat(
            [self.embeddings(input_ids), visual_tokens.to(self.embeddings.LayerNorm.weight.dtype)], dim=1
        )  # [B, Lt + M, W]
        key_mask = cat_masks([text_mask, visual_mask], dim=1)  # [B, Lt + M]
        request = block_request(iais_rows, text_mask, visual_mask, self.iais_layers, hidden.device)
        hidden, attention = self.encoder(hidden, key_mask, request, self.iais_layers)
        return EncoderOutput(hidden=hidden, text_len=text_len, attention=attention)

    def itm_logits(self, out: EncoderOutput) -> Tensor:
        """Matched / not matched logits [B, 2] from the pooled [CLS]."""
        return self.itm(out.hidden)

    def encode_image(self, visual_tokens: Tensor, visual_mask: Tensor) -> Tensor:
        """Image-only pass through the same encoder -> [B, E] L2-normalised (masked mean pooling)."""
        hidden, _ = self.encoder(visual_tokens, visual_mask.bool())
        return self.itc.image(hidden, visual_mask.bool())
