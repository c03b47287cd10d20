"""The transformer blocks shared by the backbones.

- :class:`TransformerBlock`: the pre-norm block of ViT, Swin and the X-formers. Parameter names follow
  timm's ``vision_transformer.Block`` (norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2), so a
  timm ViT's weights map onto it one to one.
- :class:`CCTBlock`: the encoder layer of Compact Convolutional Transformers, which the flat Couplformer
  reference (KCT in wer010/Couplformer) uses: pre-norm attention, then a LayerNorm *on the residual
  stream* before the MLP branch.
The token mixer comes from the attention registry.
"""

from __future__ import annotations

from typing import Any

from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn

from ..attention import attention_info, create_attention


def mixer_options(
    attention: str, options: dict[str, Any] | None, grid: tuple[int, int], num_prefix_tokens: int = 0,
    rope: bool | str = False,
) -> dict[str, Any]:
    """A mechanism's options completed with what the network knows about its tokens.

    Mechanisms built for one grid (linformer, mixer) get ``grid_size``; those that count prefix tokens
    get ``num_prefix_tokens``; ``rope=True`` (or a form, ``"2d"`` / ``"1d"``, which sets ``rope_form``) is
    passed on where the mechanism supports it and refused with a clear error where it does not.
    Mechanisms that share weights between layers (linformer's ``sharing="layerwise"``) get one
    ``layer_shared`` dict, the same for every layer built with the returned options. Options the user
    gave explicitly win.
    """
    options = dict(options or {})
    info = attention_info(attention)
    if info.fixed_grid:
        options.setdefault("grid_size", grid)
    if info.accepts("num_prefix_tokens"):
        options.setdefault("num_prefix_tokens", num_prefix_tokens)
    if info.accepts("layer_shared") and info.options() is not None:
        options.setdefault("layer_shared", {})
    if rope:
        if not info.rope:
            raise ValueError(f"pos_embed='rope' needs a mechanism that supports RoPE; {attention!r} does not")
        options["rope"] = True
        if isinstance(rope, str):
            options.setdefault("rope_form", rope)
    return options


def per_layer_options(attention: str, options: dict[str, Any] | None, layer_index: int | None) -> dict[str, Any]:
    """`options` with ``layer_index`` added for mechanisms that take one (performer: independent random
    features per layer, seeded by the index so that every rank and resume draws the same)."""
    options = dict(options or {})
    if layer_index is not None and "layer_index" not in options:
        info = attention_info(attention)
        if info.options() is not None and info.accepts("layer_index"):
            options["layer_index"] = layer_index
    return options


class TransformerBlock(nn.Module):
    """x + DropPath(LayerScale(mixer(LN(x)))), then x + DropPath(LayerScale(MLP(LN(x))))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: str = "softmax",
        attention_options: dict[str, Any] | None = None,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        layer_index: int | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        """`layer_index`: the block's index in its network, given to mechanisms that draw per layer
        (performer). `norm_eps`: the LayerNorms' epsilon (timm's 1e-6; PyTorch's default 1e-5 in the
        X-formers' and Couplformer's code)."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        options = per_layer_options(attention, attention_options, layer_index)
        self.attn = create_attention(attention, dim=dim, num_heads=num_heads, **options)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, hw: tuple[int, int], context: Tensor | None = None,
                context_hw: tuple[int, int] | None = None) -> Tensor:
        mixed = self.attn(self.norm1(x), hw, None if context is None else self.norm1(context), context_hw)
        x = x + self.drop_path1(self.ls1(mixed))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class CCTBlock(nn.Module):
    """CCT's encoder layer: x + DropPath(mixer(LN(x))), then y = LN(x), then y + DropPath(MLP(y)).

    The second LayerNorm normalises the residual stream itself, not only the MLP's input (the layer of
    Compact Convolutional Transformers and of the flat Couplformer reference). Names: norm1 (before the
    mixer), attn, norm2 (on the stream), mlp.fc1, mlp.fc2. LayerNorm epsilon 1e-5 (PyTorch's default, the
    reference's); `drop` is the dropout after the mixer's projection and in the MLP.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: str = "coupling",
        attention_options: dict[str, Any] | None = None,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_index: int | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        options = per_layer_options(attention, attention_options, layer_index)
        self.attn = create_attention(attention, dim=dim, num_heads=num_heads, **options)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, hw: tuple[int, int], context: Tensor | None = None,
                context_hw: tuple[int, int] | None = None) -> Tensor:
        mixed = self.attn(self.norm1(x), hw, None if context is None else self.norm1(context), context_hw)
        x = self.norm2(x + self.drop_path(mixed))
        return x + self.drop_path(self.mlp(x))
