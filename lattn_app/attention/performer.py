"""Performer attention, FAVOR+ (Choromanski et al.; the X-formers paper's "Performer").

Positive orthogonal random features approximate the softmax kernel exp(q.k / sqrt(d)):
    phi(x) = m^-1/2 exp(W x^ - |x^|^2 / 2 - stabiliser),  x^ = x d^-1/4,
with W (m x d) made of blocks of orthogonal rows scaled to Gaussian norms. Then
    out = D^-1 phi(q) (phi(k)^T v),  D = diag(phi(q) sum_j phi(k_j)),
in O(N m d) time and without any N x N map.

The stabiliser is a per-query maximum for queries and, for keys, the maximum over all keys of the same
sample and head: both cancel exactly in D^-1, and no sample's output depends on another sample in the
batch. Features are redrawn every ``redraw_interval`` training forward passes (never in eval mode);
``redraw_interval=None`` freezes them. Draws are seeded from ``feature_seed`` and the redraw count, so
every DDP rank and every resumed run sees the same features.
"""

from __future__ import annotations

from typing import Any

import math

import torch
from torch import Tensor

from ..registry import ATTENTIONS
from .base import Grid, QKVAttention


def orthogonal_random_features(num_features: int, dim: int, generator: torch.Generator) -> Tensor:
    """(num_features, dim) matrix: stacked blocks of orthonormal rows, each row scaled to a chi(dim) norm."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        orthonormal, _ = torch.linalg.qr(gaussian)
        blocks.append(orthonormal.T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (norms[:, None] * rows).float()


# Registered like every mechanism (decorator, class, its own options): that shared shape is on purpose.
@ATTENTIONS.register(
    "performer",
    description="Performer FAVOR+: positive orthogonal random features approximating softmax",
    time="O(N m d)",
    memory="O(m d)",
)
class PerformerAttention(QKVAttention):
    """FAVOR+ attention with orthogonal random features and periodic redraw."""

    compute_in_float32 = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_features: int | None = None,
        redraw_interval: int | None = 1000,
        feature_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(dim, num_heads, **common)
        d = self.head_dim
        self.num_features = num_features or max(1, int(d * math.log(d)))  # m = d ln d by default
        if redraw_interval is not None and redraw_interval < 0:
            raise ValueError(f"performer: redraw_interval must be >= 1 or None; got {redraw_interval}")
        self.redraw_interval = redraw_interval or None
        self.feature_seed = feature_seed
        self.register_buffer("redraws", torch.zeros((), dtype=torch.long))
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long))
        self.register_buffer("projection", self._draw(0))

    def _draw(self, redraw_index: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.feature_seed * 1_000_003 + redraw_index)
        return orthogonal_random_features(self.num_features, self.head_dim, generator)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a new random projection (called automatically while training)."""
        self.redraws += 1
        self.projection.copy_(self._draw(int(self.redraws)))
        self.calls_since_redraw.zero_()

    def feature_map(self, x: Tensor, is_query: bool) -> Tensor:
        x = x * self.head_dim**-0.25
        half_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)
        # One (B, h, N, m) buffer, updated in place (the product's backward needs x, not its output):
        # exp(W x - |x|^2/2 - stabiliser) m^-1/2 = exp(W x - |x|^2/2 - (stabiliser + ln(m)/2)).
        logits = (x @ self.projection.to(x.dtype).T).sub_(half_norm)
        with torch.no_grad():
            if is_query:  # per query: cancels in that query's own normaliser
                stabiliser = logits.amax(dim=-1, keepdim=True)
            else:  # one value per sample and head: cancels in every normaliser of that sample
                stabiliser = logits.amax(dim=(-2, -1), keepdim=True)
            stabiliser += 0.5 * math.log(self.num_features)
        return logits.sub_(stabiliser).exp_()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        if self.training and self.redraw_interval is not None:
            if int(self.calls_since_redraw) >= self.redraw_interval:
                self.redraw_features()
            self.calls_since_redraw += 1
        phi_q, phi_k = self.feature_map(q, is_query=True), self.feature_map(k, is_query=False)
        context = phi_k.transpose(-2, -1) @ v  # (B, h, m, d)
        normaliser = phi_q @ phi_k.sum(dim=-2).unsqueeze(-1)  # (B, h, N, 1)
        return (phi_q @ context) / normaliser.clamp_min(torch.finfo(normaliser.dtype).tiny)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_features={self.num_features}, redraw_interval={self.redraw_interval}"
