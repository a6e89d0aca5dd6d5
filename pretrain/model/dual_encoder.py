"""The dual encoder (CLIP): `model.architecture=dual_encoder`.

A text tower (`embeddings` + `encoder`, BERT names: `model.init_from` loads it) and an image tower
(the visual embedder + `visual_encoder` of `model.visual_layers` layers), each followed by its
projection (`itc.text_proj`, `itc.image_proj`). Nothing attends across the modalities, so there is
no joint pass: ITC is the only objective, retrieval scores by embedding, and IAIS is undefined (the
configuration refuses all of these before any process starts: `pretrain.config.check_architecture`).
The joint-pass methods of the shared interface exist and raise, naming the configuration that should
have refused the call.
"""

from __future__ import annotations

from torch import Tensor

from .config import ModelConfig
from .encoder import Encoder
from .model import EncoderOutput, ModelBase


class DualEncoderModel(ModelBase):
    """Two towers and a projection each; `encode_text` / `encode_image` are its whole use."""

    def _build_body(self, config: ModelConfig) -> None:
        self.visual_encoder = Encoder(config, config.visual_layers)  # null: num_layers; 0: no layer

    def encode_image(self, visual_tokens: Tensor, visual_mask: Tensor) -> Tensor:
        """The image tower -> [B, E] L2-normalised (masked mean pooling)."""
        hidden, _ = self.visual_encoder(visual_tokens, visual_mask.bool())
        return self.itc.image(hidden, visual_mask.bool())

    def _no_joint_pass(self, what: str) -> None:
        raise RuntimeError(
            f"{what}: model.architecture=dual_encoder has no joint pass (ITC only); the configuration "
            f"check should have refused the objective or scoring mode that asked for it"
        )

    def forward(
        self,
        input_ids: Tensor,
        text_mask: Tensor,
        visual_tokens: Tensor,
        visual_mask: Tensor,
        iais_rows: Tensor | None = None,
    ) -> EncoderOutput:
        self._no_joint_pass("forward")

    def itm_logits(self, out: EncoderOutput) -> Tensor:
        self._no_joint_pass("itm_logits")

    def mlm_logits(self, out: EncoderOutput, positions: Tensor | None = None) -> Tensor:
        self._no_joint_pass("mlm_logits")
