"""Isotropic Vision Transformer with any registered token mixer (ViT, and the X-formers' ViX).

One class covers the papers' isotropic models:
- ViT (timm-compatible parameter names and shapes, so timm ViT weights load; see timm_weights.py);
- ViX of the Hybrid Vision X-formers paper: the same network with ``attention="performer"``,
  ``"linformer"``, ``"nystrom"``; FNet and MLP-Mixer networks are ``attention="fnet"`` / ``"mixer"``;
- ``stem="xformers"``: the X-formers' hybrid convolutional stem exactly (``Models/Hybrid*.py``: three
  plain, biased 3x3 convolutions 3 -> 32 -> 64 -> dim, nothing between them; 93,248 parameters at width
  128); ``stem="conv"``: lattn's own convolutional stem (the same convolutions without bias, with
  BatchNorm and ReLU after the first two; 93,344 parameters), kept for its checkpoints;
- ``pos_embed``: ``"learned"`` (resampled to the run-time grid), ``"sincos"`` (computed for any grid),
  ``"rope"`` (2D axial rotary embedding inside the attention instead of an absolute embedding),
  ``"rope1d"`` (the X-formers' 1D rotary embedding over the token sequence, base 10,000; their ViXRoPE
  models), or ``"none"``;
- ``norm_eps``: the LayerNorms' epsilon, timm's 1e-6 by default; the X-formers' code uses PyTorch's 1e-5.
Every block passes its index to the mechanism (performer draws independent random features per layer).
Any image size whose sides divide by the patch size works at run time. Fixed-size mechanisms
(linformer, mixer) are built for the ``img_size`` grid and resample their weights for other grids.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from torch import Tensor, nn

from ..registry import BACKBONES, check_choice
from .base import Backbone, FeatureLevel, tokens_to_maps
from .blocks import TransformerBlock, mixer_options

STEMS = ("linear", "conv", "xformers")
POSITION_EMBEDDINGS = ("learned", "sincos", "rope", "rope1d", "none")
POOLINGS = ("token", "avg")


class PatchEmbed(nn.Module):
    """Images (B, C, H, W) -> patch tokens (B, H/p * W/p, dim) and the grid (H/p, W/p).

    ``stem="linear"``: one p x p convolution with stride p (timm's ``patch_embed.proj``).
    ``stem="xformers"``: the X-formers' hybrid stem: 3x3 convs (with bias) to 32, 64 and dim channels and
    nothing between them. Their code defines it for p == 1 only; for p > 1 lattn makes the last one a
    p x p stride-p conv.
    ``stem="conv"``: lattn's convolutional stem: 3x3 convs without bias to 32 and 64 channels, each
    followed by BatchNorm and ReLU, then the same last conv.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int, stem: str) -> None:
        super().__init__()
        self.patch_size = patch_size
        if stem == "linear":
            self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
            return
        last = nn.Conv2d(64, dim, 3, padding=1) if patch_size == 1 else nn.Conv2d(64, dim, patch_size, patch_size)
        if stem == "xformers":
            self.proj = nn.Sequential(nn.Conv2d(in_chans, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1), last)
        else:
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                last,
            )

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {self.patch_size}; "
                f"resize or pad the images to a multiple of {self.patch_size}"
            )
        maps = self.proj(images)
        return maps.flatten(2).transpose(1, 2), (maps.shape[-2], maps.shape[-1])


class VisionTransformer(Backbone):
    """Isotropic ViT / ViX: patch embedding, position embedding, pre-norm blocks, class or average pooling."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        attention: str = "softmax",
        attention_options: dict[str, Any] | None = None,
        stem: str = "linear",
        pos_embed: str = "learned",
        class_token: bool = True,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("vit: stem", stem, STEMS)
        check_choice("vit: pos_embed", pos_embed, POSITION_EMBEDDINGS)
        check_choice("vit: global_pool", global_pool, POOLINGS)
        if global_pool == "token" and not class_token:
            raise ValueError("vit: global_pool='token' needs class_token=True (or use global_pool='avg')")
        img_size = to_2tuple(img_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_prefix_tokens = 1 if class_token else 0
        self.pos_embed_kind = pos_embed
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.feature_info = [FeatureLevel(channels=embed_dim, stride=patch_size)]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        num_positions = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim)) if pos_embed == "learned" else None
        self.pos_drop = nn.Dropout(drop_rate)

        rope = {"rope": "2d", "rope1d": "1d"}.get(pos_embed, False)
        block_attention_options = mixer_options(
            attention, attention_options, self.grid_size, self.num_prefix_tokens, rope=rope
        )
        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, attention, block_attention_options, mlp_ratio, drop_rate,
                             drop_path, init_values, layer_index=index, norm_eps=norm_eps)
            for index, drop_path in enumerate(drop_paths)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.classifier_parts = ("head_drop", "head")
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        if pretrained:
            from .timm_weights import load_pretrained

            self.load_report = load_pretrained(self, pretrained)

    def init_weights(self) -> None:
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def position_embedding(self, grid: tuple[int, int], like: Tensor) -> Tensor | None:
        """The absolute position embedding for `grid` (prefix tokens included), or None."""
        if self.pos_embed_kind == "learned":
            return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid_size), self.num_prefix_tokens)
        if self.pos_embed_kind == "sincos":
            grid_embed = build_sincos2d_pos_embed(list(grid), self.embed_dim, device=like.device, dtype=like.dtype)
            prefix = like.new_zeros(self.num_prefix_tokens, self.embed_dim)
            return torch.cat([prefix, grid_embed])[None]
        return None

    def tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens with prefix tokens and positions, before the blocks."""
        x, grid = self.patch_embed(images)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        positions = self.position_embedding(grid, x)
        if positions is not None:
            x = x + positions
        return self.pos_drop(x), grid

    def forward_features(self, images: Tensor) -> Tensor:
        x, grid = self.tokens(images)
        for block in self.blocks:
            x = block(x, grid)
        return self.norm(x)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "token":
            pooled = features[:, 0]
        else:
            pooled = features[:, self.num_prefix_tokens :].mean(dim=1)
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        """The last block's grid tokens as one map (B, dim, H/p, W/p); necks build pyramids from it."""
        grid = (images.shape[-2] // self.patch_embed.patch_size, images.shape[-1] // self.patch_embed.patch_size)
        grid_tokens = self.forward_features(images)[:, self.num_prefix_tokens :]
        return [tokens_to_maps(grid_tokens, grid)]

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, in timm's format (used for layer-wise learning-rate decay)."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


BACKBONES.register(
    "vit",
    description="Isotropic ViT/ViX with any token mixer, linear/conv/X-formers stem, learned/sin-cos/RoPE positions",
)(VisionTransformer)


def _preset(name: str, description: str, **architecture: Any) -> None:
    """Register `name` as VisionTransformer with `architecture` as its defaults (still overridable)."""
    BACKBONES.register(name, description=description)(
        partial(VisionTransformer, **architecture)
    )


_preset("vit_tiny", "ViT-Ti/16 shapes (timm vit_tiny_patch16_224): dim 192, depth 12, 3 heads",
        embed_dim=192, depth=12, num_heads=3)
_preset("vit_small", "ViT-S/16 shapes (timm vit_small_patch16_224): dim 384, depth 12, 6 heads",
        embed_dim=384, depth=12, num_heads=6)
_preset("vit_base", "ViT-B/16 shapes (timm vit_base_patch16_224): dim 768, depth 12, 12 heads",
        embed_dim=768, depth=12, num_heads=12)
_preset("vix_cifar", "X-formers CIFAR ViX: 32x32, patch 1, dim 128, depth 4, 4 heads, MLP 256, class token",
        img_size=32, patch_size=1, num_classes=10, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)
