"""Couplformer backbones (Lan, Wang, Shen, Liang, Wei; WACV 2023): coupling attention in two models.

Both are the models of the reference code (github.com/wer010/Couplformer):

- ``couplformer``: the flat model, KCT in the reference's ``src/kct.py`` (CCT's classifier with coupling
  attention). One 4 x 4 stride-4 convolution with bias tokenises the image; a fixed 1D sinusoidal
  position embedding over the token sequence (CCT's "sine") is added; CCT's encoder layers follow (pre-norm
  attention, then a LayerNorm on the residual stream before the MLP; q/k/v without bias, attention
  dropout 0.1, stochastic depth 0.1); then a final LayerNorm, sequence pooling and the classifier. The
  preset "small" (the reference README's CIFAR model: 6 layers, width 128, 64 heads, MLP ratio 3) has
  1,009,509 trainable parameters for 100 classes, as the reference.
- ``couplformer_hierarchical``: the Swin-like model, ``Couplformer`` in the reference's ``src/vic.py``.
  A 4 x 4 patch embedding with LayerNorm, the same fixed 1D sinusoidal positions, stages of pre-norm
  blocks with *global* coupling attention in the reference's ``channel_merge="pooling"`` form (no windows:
  the coupled map is cheap enough for the whole grid; q/k/v with bias, attention dropout 0.1) and Swin's
  patch merging between stages (strides 4/8/16/32), sequence pooling. The default sizes are Swin-T's
  (96, (2, 2, 6, 2)) with head size 2; the reference's own presets (vic_6, vic_10) are three-stage
  variants of it that ``depths`` / ``num_heads`` / ``mlp_ratio`` reproduce.

Both run coupling attention by default and take any registered token mixer instead (``attention=``),
so ``attention="softmax"`` builds the same network with regular attention (same parameter names and
count). For the paper's memory comparison against the "regular Transformer", which materialises the
N x N map, pass ``attention_options={"fused": False}`` too: the default fused softmax kernel never
stores that map and then needs less activation memory than coupling attention.

What lattn offers besides (each an option; the defaults are the reference's):
- ``pos_embed="sincos2d"`` (hierarchical) / ``"learned"`` (flat): a 2D sine-cosine or a learned
  embedding. The reference's 1D sinusoid numbers the flattened grid, so on another image width vertical
  neighbours get other offsets; the 2D form keeps them (better for detection on variable sizes).
- flat ``tokenizer="conv"``, ``block="pre_norm"``, ``qkv_bias=True``, ``pos_embed="learned"``,
  ``attn_drop_rate=0``: the flat model of lattn 0.1.0 (two conv 3x3 + ReLU + max-pool stages, learned
  positions, pre-norm blocks); its checkpoints load with exactly these options.
- hierarchical ``attention_options={"variant": "concat"}``, ``pos_embed="sincos2d"``, ``norm_eps=1e-6``,
  ``attn_drop_rate=0``: the hierarchical model of lattn 0.1.0 (same parameters, other outputs).
Deliberate differences from the reference: images of any size run (the flat tokenizer pads to a multiple
of 4 and the sine positions are computed for the run-time sequence, where the reference requires square
images of the built size); the hierarchical sequence pooling scores the final width (the reference's
scoring layer is built for the first stage's width and only runs for one-stage models).

ImageNet recipe of the paper: AdamW lr 5e-4, weight decay 0.05, 10 warm-up epochs, 224x224, gradient
clipping 1.0.

    >>> from lattn_app.backbones.couplformer import couplformer
    >>> model = couplformer(num_classes=100, img_size=32)          # the reference's CIFAR model
    >>> twin = couplformer(num_classes=100, img_size=32, attention="softmax")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models.swin_transformer import PatchMerging
from torch import Tensor, nn
from torch.nn import functional as F

from ..attention import attention_info
from ..registry import BACKBONES, check_choice
from .base import Backbone, FeatureLevel, tokens_to_maps
from .blocks import CCTBlock, TransformerBlock, mixer_options

Grid = tuple[int, int]
GLOBAL_POOLS = ("attention", "avg")
FLAT_TOKENIZERS = ("patch", "conv")
FLAT_POSITIONS = ("sine", "learned")
FLAT_BLOCKS = ("cct", "pre_norm")
HIERARCHICAL_POSITIONS = ("sine", "sincos2d")


@dataclass(frozen=True)
class FlatPreset:
    """Size of a flat Couplformer."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float


# The reference's presets (src/kct.py) and its README's CIFAR model. "small" is the README's (kct_sd with
# 6 layers, width 128, 64 heads, MLP ratio 3); "medium" and "large" are kct_7 and kct_14. All are the
# same KCT network; only these four numbers differ.
FLAT_PRESETS: dict[str, FlatPreset] = {
    "small": FlatPreset(depth=6, embed_dim=128, num_heads=64, mlp_ratio=3.0),
    "medium": FlatPreset(depth=7, embed_dim=256, num_heads=4, mlp_ratio=2.0),
    "large": FlatPreset(depth=14, embed_dim=384, num_heads=6, mlp_ratio=3.0),
    "kct_2": FlatPreset(depth=2, embed_dim=128, num_heads=2, mlp_ratio=1.0),
    "kct_4": FlatPreset(depth=4, embed_dim=128, num_heads=2, mlp_ratio=1.0),
    "kct_6": FlatPreset(depth=6, embed_dim=256, num_heads=4, mlp_ratio=2.0),
    "kct_7": FlatPreset(depth=7, embed_dim=256, num_heads=4, mlp_ratio=2.0),
    "kct_8": FlatPreset(depth=8, embed_dim=256, num_heads=128, mlp_ratio=2.0),
    "kct_14": FlatPreset(depth=14, embed_dim=384, num_heads=6, mlp_ratio=3.0),
    "kct_16": FlatPreset(depth=16, embed_dim=384, num_heads=6, mlp_ratio=3.0),
}


def sinusoidal_positions(num_tokens: int, dim: int, device=None, dtype=None) -> Tensor:
    """CCT's fixed 1D position embedding (1, N, C): sin(p w_i) in even, cos(p w_i) in odd channels i, with
    w_i = 10000^(-2 floor(i / 2) / C), for token index p of the flattened sequence."""
    exponent = 2 * (torch.arange(dim, device=device, dtype=torch.float64) // 2) / dim
    angles = torch.arange(num_tokens, device=device, dtype=torch.float64)[:, None] / 10000**exponent
    table = torch.where(torch.arange(dim, device=device) % 2 == 0, angles.sin(), angles.cos())
    return table[None].to(dtype or torch.get_default_dtype())


def _with_defaults(attention: str, options: dict[str, Any] | None, **defaults: Any) -> dict[str, Any]:
    """`options` completed with `defaults` the mechanism accepts; the user's own options win."""
    options = dict(options or {})
    info = attention_info(attention)
    for name, value in defaults.items():
        if info.options() is not None and info.accepts(name):
            options.setdefault(name, value)
    return options


def _drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Stochastic depth growing linearly from 0 in the first block to `drop_path_rate` in the last."""
    return torch.linspace(0, drop_path_rate, num_blocks).tolist()


def _init_weights(module: nn.Module) -> None:
    # The reference (and timm's ViT/Swin) initialisation: truncated normal linears, unit LayerNorms.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SequencePooling(nn.Module):
    """CCT's sequence pooling: softmax over tokens of a learned score, then the score-weighted average.

    Unlike a class token it adds no token off the grid, and unlike mean pooling it lets the network
    choose which tokens matter.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.Linear(dim, 1)

    def weights(self, tokens: Tensor) -> Tensor:
        """Pooling weights (B, N), each row summing to one."""
        return torch.softmax(self.attention(tokens).squeeze(-1), dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.einsum("bn,bnc->bc", self.weights(tokens), tokens)


class MeanPooling(nn.Module):
    """Average over tokens (Swin's global average pooling)."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)


def _make_pool(global_pool: str, dim: int) -> nn.Module:
    check_choice("global_pool", global_pool, GLOBAL_POOLS)
    return SequencePooling(dim) if global_pool == "attention" else MeanPooling()


class PatchTokenizer(nn.Module):
    """The reference's KCT tokenizer: one p x p convolution with stride p and bias (Kaiming-normal weights).

    Images whose sides are not multiples of p are zero-padded at the bottom and right first.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.stride = self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        nn.init.kaiming_normal_(self.proj.weight)

    def grid(self, image_size: Grid) -> Grid:
        return -(-image_size[0] // self.patch_size), -(-image_size[1] // self.patch_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Grid]:
        pad_h, pad_w = (-images.shape[-2]) % self.patch_size, (-images.shape[-1]) % self.patch_size
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        maps = self.proj(images)
        return maps.flatten(2).transpose(1, 2), (maps.shape[-2], maps.shape[-1])


class ConvTokenizer(nn.Module):
    """CCT's convolutional tokenizer: `num_layers` x (conv 3x3, ReLU, max-pool 3x3 stride 2).

    Each layer halves the grid (rounding up), so two layers give stride-4 tokens. The tokenizer of
    lattn 0.1.0's flat model (``tokenizer="conv"``), not the reference's.
    """

    def __init__(self, in_chans: int, embed_dim: int, num_layers: int = 2, hidden_chans: int = 64) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the tokenizer needs at least one conv layer; got num_layers={num_layers}")
        channels = [in_chans] + [hidden_chans] * (num_layers - 1) + [embed_dim]
        self.layers = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                )
                for c_in, c_out in zip(channels[:-1], channels[1:])
            ]
        )
        self.stride = 2**num_layers
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def grid(self, image_size: Grid) -> Grid:
        """Token grid for an image of `image_size` (each max-pool rounds up)."""
        h, w = image_size
        for _ in self.layers:
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def forward(self, images: Tensor) -> tuple[Tensor, Grid]:
        maps = self.layers(images)
        return maps.flatten(2).transpose(1, 2), (maps.shape[-2], maps.shape[-1])


class Couplformer(Backbone):
    """Flat Couplformer, the reference's KCT: patch tokenizer, sine positions, CCT layers, sequence pooling.

    Isotropic: every block sees the same stride-4 token grid, so the feature pyramid has a single
    level, the normalised final tokens as a (B, C, H/4, W/4) map. Input sizes other than `img_size`
    (including non-square ones) work. See the module docstring for the options and lattn 0.1.0's model.
    """

    def __init__(
        self,
        *,
        depth: int,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float,
        attention: str = "coupling",
        attention_options: dict[str, Any] | None = None,
        num_classes: int = 1000,
        img_size: int | Grid = 224,
        in_chans: int = 3,
        tokenizer: str = "patch",
        patch_size: int = 4,
        tokenizer_layers: int = 2,
        pos_embed: str = "sine",
        block: str = "cct",
        qkv_bias: bool = False,
        attn_drop_rate: float = 0.1,
        global_pool: str = "attention",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        check_choice("couplformer: tokenizer", tokenizer, FLAT_TOKENIZERS)
        self.pos_embed_kind = check_choice("couplformer: pos_embed", pos_embed, FLAT_POSITIONS)
        check_choice("couplformer: block", block, FLAT_BLOCKS)
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.img_size = to_2tuple(img_size)
        if tokenizer == "patch":
            self.tokenizer = PatchTokenizer(in_chans, embed_dim, patch_size)
        else:
            self.tokenizer = ConvTokenizer(in_chans, embed_dim, num_layers=tokenizer_layers)
        self.grid_size = self.tokenizer.grid(self.img_size)
        self.feature_info = [FeatureLevel(channels=embed_dim, stride=self.tokenizer.stride)]

        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        options = _with_defaults(attention, attention_options, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                 proj_drop=drop_rate)
        options = mixer_options(attention, options, self.grid_size)
        block_class = CCTBlock if block == "cct" else TransformerBlock
        self.blocks = nn.ModuleList(
            [
                block_class(embed_dim, num_heads, attention, options, mlp_ratio, drop_rate, rate, layer_index=index)
                for index, rate in enumerate(_drop_path_rates(drop_path_rate, depth))
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier_parts = ("pool", "head")
        self.pool = _make_pool(global_pool, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(_init_weights)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.2)  # CCT's learnable embedding init

    def position_embedding(self, hw: Grid, like: Tensor) -> Tensor:
        """The position embedding (1, H*W, C) for a token grid `hw`."""
        if self.pos_embed is None:
            return sinusoidal_positions(hw[0] * hw[1], self.num_features, like.device, like.dtype)
        if hw == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(hw), list(self.grid_size), num_prefix_tokens=0)

    def encode(self, images: Tensor) -> tuple[Tensor, Grid]:
        """Normalised final tokens (B, H/4 * W/4, C) and their grid."""
        tokens, hw = self.tokenizer(images)
        tokens = self.pos_drop(tokens + self.position_embedding(hw, tokens))
        for block in self.blocks:
            tokens = block(tokens, hw)
        return self.norm(tokens), hw

    def forward_features(self, images: Tensor) -> Tensor:
        return self.encode(images)[0]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.pool(features)
        return pooled if pre_logits else self.head(pooled)

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        tokens, hw = self.encode(images)
        return [tokens_to_maps(tokens, hw)]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.pos_embed is not None else set()


class CouplformerStage(nn.Module):
    """One stage of the hierarchical model: optional 2x2 patch merging, then global-attention blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        attention: str,
        attention_options: dict[str, Any],
        mlp_ratio: float,
        drop_rate: float,
        drop_path_rates: list[float],
        first_layer_index: int = 0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stage width {dim} must be divisible by its num_heads {num_heads}")
        self.downsample = PatchMerging(in_dim, out_dim=dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(dim, num_heads, attention, attention_options, mlp_ratio, drop_rate, rate,
                                 layer_index=first_layer_index + index, norm_eps=norm_eps)
                for index, rate in enumerate(drop_path_rates)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C_in) -> (B, H', W', C), H' = ceil(H / 2) when the stage downsamples."""
        x = self.downsample(x)
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        for block in self.blocks:
            tokens = block(tokens, (height, width))
        return tokens.view(batch, height, width, channels)


# Repeats the flat model's options on purpose: each model's signature lists its options explicitly.
class CouplformerHierarchical(Backbone):
    """Swin-like Couplformer: 4x4 patches, stages with global attention and patch merging between them.

    No windows and no shifts: coupling attention covers the whole grid at H^2 + W^2 map memory per head.
    With coupling attention its ``variant`` defaults to the reference's "pooling" (channel_merge).
    Any input size works; odd grids are padded by patch merging. The pyramid is the output of every
    stage, (B, C_i, ceil(H / s_i), ceil(W / s_i)) with s_i = 4, 8, 16, 32; the last level carries the
    final LayerNorm, the others are the raw stage outputs (as timm's Swin features).
    """

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (48, 96, 192, 384),
        mlp_ratio: float = 4.0,
        attention: str = "coupling",
        attention_options: dict[str, Any] | None = None,
        num_classes: int = 1000,
        img_size: int | Grid = 224,
        in_chans: int = 3,
        patch_size: int = 4,
        pos_embed: str = "sine",
        qkv_bias: bool = True,
        attn_drop_rate: float = 0.1,
        norm_eps: float = 1e-5,
        global_pool: str = "attention",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.pos_embed_kind = check_choice("couplformer_hierarchical: pos_embed", pos_embed, HIERARCHICAL_POSITIONS)
        if len(depths) != len(num_heads):
            raise ValueError(
                f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage"
            )
        if embed_dim % 4 and pos_embed == "sincos2d":
            raise ValueError(
                f"embed_dim {embed_dim} must be divisible by 4 (2D sine-cosine position embedding)"
            )
        self.num_classes = num_classes
        self.img_size = to_2tuple(img_size)
        widths = [embed_dim * 2**i for i in range(len(depths))]
        strides = [patch_size * 2**i for i in range(len(depths))]
        self.num_features = widths[-1]
        self.feature_info = [FeatureLevel(channels=c, stride=s) for c, s in zip(widths, strides)]

        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.pos_drop = nn.Dropout(drop_rate)
        rates = _drop_path_rates(drop_path_rate, sum(depths))
        defaults = {"variant": "pooling"} if attention == "coupling" else {}
        attention_options = _with_defaults(attention, attention_options, qkv_bias=qkv_bias,
                                           attn_drop=attn_drop_rate, proj_drop=drop_rate, **defaults)
        self.stages = nn.ModuleList()
        for i, (width, depth, heads, stride) in enumerate(zip(widths, depths, num_heads, strides)):
            grid = (-(-self.img_size[0] // stride), -(-self.img_size[1] // stride))
            first = sum(depths[:i])
            self.stages.append(
                CouplformerStage(
                    in_dim=widths[max(i - 1, 0)],
                    dim=width,
                    depth=depth,
                    num_heads=heads,
                    downsample=i > 0,
                    attention=attention,
                    attention_options=mixer_options(attention, attention_options, grid),
                    mlp_ratio=mlp_ratio,
                    drop_rate=drop_rate,
                    drop_path_rates=rates[first : first + depth],
                    first_layer_index=first,
                    norm_eps=norm_eps,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.classifier_parts = ("pool", "head")
        self.pool = _make_pool(global_pool, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens (B, H/4, W/4, C) with the fixed position embedding added (computed for any grid):
        the reference's 1D sinusoid over the flattened grid, or a 2D sine-cosine one (``"sincos2d"``)."""
        x = self.patch_embed(images)
        height, width, channels = x.shape[1:]
        if self.pos_embed_kind == "sine":
            position = sinusoidal_positions(height * width, channels, x.device, x.dtype)
        else:
            position = build_sincos2d_pos_embed([height, width], channels, device=x.device, dtype=x.dtype)
        return self.pos_drop(x + position.view(height, width, channels))

    def stage_outputs(self, images: Tensor) -> list[Tensor]:
        """Every stage's output (B, H_i, W_i, C_i); the last one normalised."""
        x = self.embed(images)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        outputs[-1] = self.norm(outputs[-1])
        return outputs

    def forward_features(self, images: Tensor) -> Tensor:
        """Normalised last-stage tokens (B, H/32 * W/32, C)."""
        return self.stage_outputs(images)[-1].flatten(1, 2)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.pool(features)
        return pooled if pre_logits else self.head(pooled)

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        return [x.permute(0, 3, 1, 2) for x in self.stage_outputs(images)]


@BACKBONES.register(
    "couplformer",
    description="Couplformer (flat, the reference KCT): 4x4 patch tokens, sine positions, CCT layers, sequence pooling",
    time="O(N (H + W) C) per block with coupling attention",
    memory="O(H^2 + W^2) per head with coupling attention",
)
def couplformer(
    *,
    preset: str = "small",
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    attention: str = "coupling",
    attention_options: dict[str, Any] | None = None,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    tokenizer: str = "patch",
    pos_embed: str = "sine",
    block: str = "cct",
    qkv_bias: bool = False,
    attn_drop_rate: float = 0.1,
    global_pool: str = "attention",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.1,
    pretrained: str | None = None,
) -> Couplformer:
    """Flat Couplformer (the reference's KCT) of size `preset`: "small" (the reference README's CIFAR
    model), "medium" (= kct_7), "large" (= kct_14), or any reference name kct_2 ... kct_16 (see
    ``FLAT_PRESETS``).

    `depth`, `embed_dim`, `num_heads` and `mlp_ratio` override the preset's value when given.
    `attention` is any registered token mixer ("softmax" gives the regular-Transformer twin);
    `attention_options` go to it (e.g. ``{"variant": "pooling"}`` for coupling) and win over
    `qkv_bias` (False, the reference's) and `attn_drop_rate` (0.1, the reference's).
    `tokenizer` "patch" (the reference's 4x4 stride-4 convolution) or "conv" (lattn 0.1.0's CCT-style
    conv stages); `pos_embed` "sine" (the reference's fixed 1D sinusoid) or "learned"; `block` "cct"
    (the reference's layer) or "pre_norm" (lattn 0.1.0's). `global_pool` is "attention" (CCT's sequence
    pooling, the reference) or "avg".
    `pretrained`: weights to load (a file or a lattn ``.ckpt``; see ``Backbone.load_pretrained``).
    """
    check_choice("couplformer preset", preset, list(FLAT_PRESETS))
    size = FLAT_PRESETS[preset]
    model = Couplformer(
        depth=size.depth if depth is None else depth,
        embed_dim=size.embed_dim if embed_dim is None else embed_dim,
        num_heads=size.num_heads if num_heads is None else num_heads,
        mlp_ratio=size.mlp_ratio if mlp_ratio is None else mlp_ratio,
        attention=attention,
        attention_options=attention_options,
        num_classes=num_classes,
        img_size=img_size,
        in_chans=in_chans,
        tokenizer=tokenizer,
        pos_embed=pos_embed,
        block=block,
        qkv_bias=qkv_bias,
        attn_drop_rate=attn_drop_rate,
        global_pool=global_pool,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    if pretrained:
        model.load_pretrained(pretrained)
    return model


@BACKBONES.register(
    "couplformer_hierarchical",
    description="Couplformer (Swin-like): 4 stages of global coupled attention, strides 4/8/16/32",
    time="O(N (H + W) C) per block with coupling attention",
    memory="O(H^2 + W^2) per head with coupling attention",
)
def couplformer_hierarchical(
    *,
    embed_dim: int = 96,
    depths: tuple[int, ...] = (2, 2, 6, 2),
    num_heads: tuple[int, ...] = (48, 96, 192, 384),
    mlp_ratio: float = 4.0,
    attention: str = "coupling",
    attention_options: dict[str, Any] | None = None,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    pos_embed: str = "sine",
    qkv_bias: bool = True,
    attn_drop_rate: float = 0.1,
    norm_eps: float = 1e-5,
    global_pool: str = "attention",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.1,
    pretrained: str | None = None,
) -> CouplformerHierarchical:
    """Hierarchical Couplformer (the reference's ``src/vic.py`` model); the default sizes are Swin-T's
    widths and depths (96, (2, 2, 6, 2)); the reference's vic_10 at width C is
    ``depths=(2, 6, 2), num_heads=(C // 2, C, C), mlp_ratio=3``.

    Widths double every stage. `num_heads` defaults to head size 2 in every stage, the reference's
    many tiny heads. Coupling attention runs in the reference's ``variant="pooling"`` unless
    `attention_options` say otherwise. `pos_embed` "sine" (the reference's 1D sinusoid) or "sincos2d"
    (2D, lattn 0.1.0's). `qkv_bias`, `attn_drop_rate` and `norm_eps` (LayerNorm epsilon) default to the
    reference's values. `attention`, `attention_options` and `global_pool` as in :func:`couplformer`.
    `img_size` only matters to mechanisms built for one grid (linformer, mixer). `pretrained` as in
    :func:`couplformer`.
    """
    model = CouplformerHierarchical(
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        mlp_ratio=mlp_ratio,
        attention=attention,
        attention_options=attention_options,
        num_classes=num_classes,
        img_size=img_size,
        in_chans=in_chans,
        pos_embed=pos_embed,
        qkv_bias=qkv_bias,
        attn_drop_rate=attn_drop_rate,
        norm_eps=norm_eps,
        global_pool=global_pool,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    if pretrained:
        model.load_pretrained(pretrained)
    return model
