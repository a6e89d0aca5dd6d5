"""The single-stream image-text model: config, embeddings, visual embedders, encoder, heads.

`RelAlignModel` is what the trainer builds; `EncoderOutput.attention` carries the IAIS blocks
(`AttentionBlocks`) of the layers set with `RelAlignModel.set_iais_layers`.
"""
from .config import PRESETS, ModelConfig
from .encoder import AttentionBlocks
from .hf_init import load_hf_text_weights
from .model import EncoderOutput, RelAlignModel

__all__ = ["PRESETS", "AttentionBlocks", "EncoderOutput", "ModelConfig", "RelAlignModel", "load_hf_text_weights"]
