"""Linformer attention (Wang et al.; the X-formers paper's "Linformer").

out = softmax(q (E k)^T / sqrt(d)) (F v) with learned projections E, F in R^{k x HW} that compress
the H*W grid keys and values to k rows (k = 64 by default), so the map is N x k.

E and F tie the layer to the grid it was built for (``grid_size``). Prefix tokens (class token) are not
projected: their keys and values join the k compressed rows, so every query still sees them directly.
On another grid, ``on_other_grid="resample"`` (default) bilinearly resamples E and F over (H, W) and
rescales them by (H*W)/(H'*W') so the compressed sums keep their magnitude (fine-tuning at a new
resolution works); ``on_other_grid="error"`` refuses other grids with the supported size named.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import ATTENTIONS
from .base import Grid, QKVAttention, check_grid_policy, num_prefix, resample_grid_weight


@ATTENTIONS.register(
    "linformer",
    description="Linformer: learned length-k projections of keys and values (built for one grid)",
    time="O(N k d)",
    memory="O(N k)",
)
class LinformerAttention(QKVAttention):
    """Linformer attention with shared-across-heads key and value projections."""

    supports_rope = True
    supports_cross_attention = True
    needs_grid = True
    fixed_grid = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid_size: tuple[int, int] = (14, 14),
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rope: bool = False,
        rope_base: float = 100.0,
        k: int = 64,
        on_other_grid: str = "resample",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, rope, rope_base)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.k = k
        self.on_other_grid = check_grid_policy(on_other_grid, "linformer")
        num_tokens = self.grid_size[0] * self.grid_size[1]
        self.key_projection = nn.Parameter(torch.randn(k, num_tokens) * k**-0.5)  # E
        self.value_projection = nn.Parameter(torch.randn(k, num_tokens) * k**-0.5)  # F

    def compress(self, t: Tensor, projection: Tensor, hw: Grid) -> Tensor:
        """[prefix tokens ; projection @ grid tokens] for t (B, h, N, d)."""
        prefix = num_prefix(t.shape[-2], hw)
        projection = resample_grid_weight(
            projection, self.grid_size, hw, grid_dim=1, preserve_sum=True,
            mechanism="linformer", policy=self.on_other_grid,
        )
        # All heads in one product: (k, HW) @ (B, HW, h*d), where (B, HW, h*d) is a view of the qkv
        # projection's output (per-head slices of it would each be copied to be multiplied).
        heads, head_dim = t.shape[1], t.shape[-1]
        grid_tokens = t[..., prefix:, :].transpose(1, 2).flatten(2)
        compressed = (projection.to(t.dtype) @ grid_tokens).unflatten(-1, (heads, head_dim)).transpose(1, 2)
        return torch.cat([t[..., :prefix, :], compressed], dim=-2) if prefix else compressed

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        assert kv_hw is not None  # needs_grid
        k = self.compress(k, self.key_projection, kv_hw)
        v = self.compress(v, self.value_projection, kv_hw)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid_size={self.grid_size}, k={self.k}, on_other_grid={self.on_other_grid}"
