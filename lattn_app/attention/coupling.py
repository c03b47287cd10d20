"""Coupling attention (Couplformer; Lan, Wang, Shen, Liang, Wei; WACV 2023).

The N x N map of softmax attention is replaced by the Kronecker product of a row map and a column map.
Per head, with q, k, v reshaped to H x W x d:
    A = softmax_row(Q_r K_r^T s)  (H x H),  Q_r: q as H rows of W*d values ("concat" variant)
    B = softmax_row(Q_c K_c^T s)  (W x W),  Q_c: q as W columns of H*d values
    Y_j = A V_j B^T for every channel j, i.e. (A kron B) vec(V_j).
The "pooling" variant takes the maximum over the head dimension first (one value per token). Map memory
is H^2 + W^2 per head instead of (HW)^2; s = d^-1/4 as in the reference code unless ``scale`` is given.
Dropout acts on A and B separately.

Prefix tokens have no place on the grid: their queries use exact softmax attention over all keys (cost
O(N) per prefix token), so a class token still sees the whole image; grid queries use the coupled map
over the grid keys. Cross-attention needs the context on a grid of the same H x W.
"""

from __future__ import annotations


import torch
from torch import Tensor
from torch.nn import functional as F

from ..registry import ATTENTIONS, check_choice
from .base import Grid, QKVAttention, num_prefix

VARIANTS = ("concat", "pooling")


# Registered like every mechanism (decorator, class, its own options): that shared shape is on purpose.
@ATTENTIONS.register(
    "coupling",
    description="Couplformer: attention map coupled from an H x H row map and a W x W column map",
    time="O(N (H + W) d)",
    memory="O(H^2 + W^2)",
)
class CouplingAttention(QKVAttention):
    """Couplformer's coupling attention: (A kron B) applied to v."""

    needs_grid = True
    supports_rope = False
    cross_attention_grid = "same grid"  # the context must share the query's H x W (see forward)
    compute_in_float32 = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        variant: str = "concat",
        scale: float | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        # The common options but rope (its row and column maps have no per-token rotation to apply).
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.variant = check_choice("coupling: variant", variant, VARIANTS)
        self.scale = self.head_dim**-0.25 if scale is None else scale

    def coupled_maps(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Row map A (B, h, H, H) and column map B (B, h, W, W) from grid-shaped q, k (B, h, H, W, d)."""
        if self.variant == "pooling":
            q, k = q.amax(dim=-1), k.amax(dim=-1)  # (B, h, H, W): one value per token
            rows = q @ k.transpose(-2, -1)
            cols = q.transpose(-2, -1) @ k
        else:  # rows as H tokens of W*d values, columns as W tokens of H*d values
            rows = q.flatten(-2) @ k.flatten(-2).transpose(-2, -1)
            cols = q.transpose(2, 3).flatten(-2) @ k.transpose(2, 3).flatten(-2).transpose(-2, -1)
        row_map = F.dropout(torch.softmax(rows * self.scale, dim=-1), self.attn_drop, self.training)
        col_map = F.dropout(torch.softmax(cols * self.scale, dim=-1), self.attn_drop, self.training)
        return row_map, col_map

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        assert q_hw is not None and kv_hw is not None  # needs_grid
        if q_hw != kv_hw:
            raise ValueError(
                f"coupling attention couples rows and columns of one grid: the context grid {kv_hw} "
                f"must equal the query grid {q_hw}"
            )
        q_prefix, kv_prefix = num_prefix(q.shape[-2], q_hw), num_prefix(k.shape[-2], kv_hw)
        grid_q = q[..., q_prefix:, :].unflatten(-2, q_hw)
        grid_k = k[..., kv_prefix:, :].unflatten(-2, kv_hw)
        grid_v = v[..., kv_prefix:, :].unflatten(-2, kv_hw)
        row_map, col_map = self.coupled_maps(grid_q, grid_k)
        # Y_j = A V_j B^T for every channel j as two plain matrix products, neither map repeated per row
        # or channel: A times V laid out as H x (d W), then that viewed as (H d) x W times B^T.
        batch, heads, height, width, head_dim = grid_v.shape
        v_rows = grid_v.transpose(-2, -1).reshape(batch, heads, height, head_dim * width)
        out = (row_map @ v_rows).view(batch, heads, height * head_dim, width) @ col_map.transpose(-2, -1)
        out = out.view(batch, heads, height, head_dim, width).transpose(-2, -1).reshape(
            batch, heads, height * width, head_dim
        )
        if q_prefix:
            dropout = self.attn_drop if self.training else 0.0
            prefix_out = F.scaled_dot_product_attention(q[..., :q_prefix, :], k, v, dropout_p=dropout)
            out = torch.cat([prefix_out, out], dim=-2)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}, scale={self.scale:.4g}"
