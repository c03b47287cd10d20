"""2D axial rotary position embedding (RoPE) for tokens on an H x W grid.

The head dimension d is split in two halves: the first half is rotated by the token's row index, the
second by its column index, each with the usual geometric ladder of d/4 frequencies. The dot product of
a rotated query and key then depends on their relative offset (dy, dx) only. Prefix tokens (class token
and the like) carry no position and are left unrotated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding2D(nn.Module):
    """Axial 2D rotary embedding; ``rope(t, hw)`` rotates the last H*W tokens of t (B, heads, N, d)."""

    def __init__(self, head_dim: int, base: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(
                f"2D rotary embedding needs a head size divisible by 4 (two axes x cos/sin pairs); "
                f"got head size {head_dim}"
            )
        self.head_dim = head_dim
        self.base = base
        quarter = head_dim // 4
        inv_freq = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def angles(self, hw: tuple[int, int], device: torch.device) -> Tensor:
        """Rotation angles (H*W, d/2): row angles for the first d/4 pairs, column angles for the rest."""
        height, width = hw
        rows = torch.arange(height, device=device, dtype=torch.float32)
        cols = torch.arange(width, device=device, dtype=torch.float32)
        inv_freq = self.inv_freq.to(device)
        row_angles = torch.outer(rows, inv_freq)[:, None, :].expand(height, width, -1)
        col_angles = torch.outer(cols, inv_freq)[None, :, :].expand(height, width, -1)
        return torch.cat([row_angles, col_angles], dim=-1).reshape(height * width, -1)

    def forward(self, t: Tensor, hw: tuple[int, int]) -> Tensor:
        num_spatial = hw[0] * hw[1]
        prefix, spatial = t[..., : t.shape[-2] - num_spatial, :], t[..., -num_spatial:, :]
        angles = self.angles(hw, t.device)
        cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
        # Consecutive channel pairs (2i, 2i+1) are rotated by angle i.
        pairs = spatial.unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
        return torch.cat([prefix, rotated], dim=-2)
