"""MLP-Mixer token mixing (Tolstikhin et al.; the X-formers paper's "MLP-Mixer").

A two-layer MLP across the token axis, shared by all channels: out = W2 GELU(W1 x^T + b1) + b2, with
W1 (hidden x N) and W2 (N x hidden) for the N = num_prefix_tokens + H*W tokens it was built for
(``grid_size``). On another grid, ``on_other_grid="resample"`` (default) bilinearly resamples the grid
part of W1 (rescaled by (H*W)/(H'*W'), since it sums over tokens), W2 and b2; prefix-token weights are
kept. ``on_other_grid="error"`` refuses other grids with the supported size named. ``num_heads`` is
accepted for a uniform interface and ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import ATTENTIONS
from .base import Grid, TokenMixer, check_grid_policy, num_prefix, resample_grid_weight


# Registered like every mechanism (decorator, class, its own options): that shared shape is on purpose.
@ATTENTIONS.register(
    "mixer",
    description="MLP-Mixer token-mixing MLP across the N tokens (built for one grid)",
    time="O(N h C)",
    memory="O(N C)",
)
class MixerTokenMixing(TokenMixer):
    """Token-mixing MLP of MLP-Mixer."""

    needs_grid = True
    fixed_grid = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        grid_size: tuple[int, int] = (14, 14),
        num_prefix_tokens: int = 0,
        hidden_dim: int = 256,
        drop: float = 0.0,
        on_other_grid: str = "resample",
    ) -> None:
        super().__init__(dim)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.on_other_grid = check_grid_policy(on_other_grid, "mixer")
        num_tokens = num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.fc1 = nn.Linear(num_tokens, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_tokens)
        self.drop = nn.Dropout(drop)

    def mix(self, x: Tensor, hw: Grid | None, context: Tensor | None, context_hw: Grid | None) -> Tensor:
        assert hw is not None  # needs_grid
        prefix = num_prefix(x.shape[1], hw)
        if prefix != self.num_prefix_tokens:
            raise ValueError(
                f"mixer was built for {self.num_prefix_tokens} prefix tokens; x has {prefix} "
                f"({x.shape[1]} tokens on a {hw[0]}x{hw[1]} grid)"
            )
        p = self.num_prefix_tokens

        def resample(weight: Tensor, grid_dim: int, preserve_sum: bool) -> Tensor:
            if p == 0:  # no split: its backward would build a gradient of the whole weight a second time
                return resample_grid_weight(
                    weight, self.grid_size, hw, grid_dim, preserve_sum, "mixer", self.on_other_grid
                )
            kept, grid = weight.split([p, weight.shape[grid_dim] - p], dim=grid_dim)
            grid = resample_grid_weight(
                grid, self.grid_size, hw, grid_dim, preserve_sum, "mixer", self.on_other_grid
            )
            return torch.cat([kept, grid], dim=grid_dim)

        w1 = resample(self.fc1.weight, grid_dim=1, preserve_sum=True)
        w2 = resample(self.fc2.weight, grid_dim=0, preserve_sum=False)
        b2 = resample(self.fc2.bias, grid_dim=0, preserve_sum=False)
        # The MLP runs along the token axis: with the N tokens as the channels of a 1x1 convolution,
        # W1 (hidden, N) applies to x (B, N, C) as it is (no transposed copy of x), and the output comes
        # out as (B, N, C) directly.
        hidden = F.gelu(F.conv1d(x, w1.unsqueeze(-1), self.fc1.bias))
        if self.training and self.drop.p > 0:
            hidden = self.drop(hidden)
        out = F.conv1d(hidden, w2.unsqueeze(-1), b2)
        return self.drop(out) if self.training and self.drop.p > 0 else out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}, "
            f"on_other_grid={self.on_other_grid}"
        )
