"""The image-text models: config, embeddings, visual embedders, encoders, heads, architectures.

`build_model(config)` is the one place a model is constructed (trainer, finetuning, export): it
picks the class of `config.architecture` (single_stream: `RelAlignModel`, two_stream:
`TwoStreamModel`, dual_encoder: `DualEncoderModel`), which share one interface. `EncoderOutput.attention`
carries the IAIS blocks (`AttentionBlocks`) of the layers set with `set_iais_layers`.
"""

from .config import ARCHITECTURES, PRESETS, ModelConfig
from .dual_encoder import DualEncoderModel
from .encoder import AttentionBlocks
from .freeze import freeze_text
from .hf_init import load_hf_text_weights
from .model import EncoderOutput, ModelBase, RelAlignModel
from .two_stream import TwoStreamModel

MODEL_CLASSES = {"single_stream": RelAlignModel, "two_stream": TwoStreamModel, "dual_encoder": DualEncoderModel}


def build_model(config: ModelConfig) -> ModelBase:
    """A freshly initialised model of `config.architecture` (vocab_size must be set), its
    `model.freeze_text` part frozen (requires_grad False: the optimizer never sees it)."""
    model = MODEL_CLASSES[config.architecture](config)
    freeze_text(model, config.freeze_text)
    return model


__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "AttentionBlocks",
    "DualEncoderModel",
    "EncoderOutput",
    "ModelBase",
    "ModelConfig",
    "RelAlignModel",
    "TwoStreamModel",
    "build_model",
    "load_hf_text_weights",
]
