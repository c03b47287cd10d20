"""The pre-norm transformer block shared by the isotropic and hierarchical backbones.

Parameter names follow timm's ``vision_transformer.Block`` (norm1, attn.qkv, attn.proj, ls1, norm2,
mlp.fc1, mlp.fc2, ls2), so a timm ViT's weights map onto it one to one; the token mixer comes from the
attention registry.
"""

from __future__ import annotations

from typing import Any

from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn

from ..attention import attention_info, create_attention


def mixer_options(
    attention: str, options: dict[str, Any] | None, grid: tuple[int, int], num_prefix_tokens: int = 0,
    rope: bool = False,
) -> dict[str, Any]:
    """A mechanism's options completed with what the network knows about its tokens.

    Mechanisms built for one grid (linformer, mixer) get ``grid_size``; those that count prefix tokens
    get ``num_prefix_tokens``; ``rope=True`` is passed on where the mechanism supports it and refused
    with a clear error where it does not. Options the user gave explicitly win.
    """
    options = dict(options or {})
    info = attention_info(attention)
    if info.fixed_grid:
        options.setdefault("grid_size", grid)
    if info.accepts("num_prefix_tokens"):
        options.setdefault("num_prefix_tokens", num_prefix_tokens)
    if rope:
        if not info.rope:
            raise ValueError(f"pos_embed='rope' needs a mechanism that supports RoPE; {attention!r} does not")
        options["rope"] = True
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
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = create_attention(attention, dim=dim, num_heads=num_heads, **(attention_options or {}))
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, hw: tuple[int, int], context: Tensor | None = None,
                context_hw: tuple[int, int] | None = None) -> Tensor:
        mixed = self.attn(self.norm1(x), hw, None if context is None else self.norm1(context), context_hw)
        x = x + self.drop_path1(self.ls1(mixed))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
