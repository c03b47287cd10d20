"""Nystromformer attention (Xiong et al.; the X-formers paper's "Nystromformer").

With m landmarks q~, k~ (segment means of q and k), softmax attention is approximated as
    out = softmax(q k~^T) pinv(softmax(q~ k~^T)) softmax(q~ k^T) v  (+ depthwise conv of v),
q and k each scaled by d^-1/4. The pseudo-inverse is computed by Newton iterations
Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z))) from Z0 = A^T / (|A|_1 |A|_inf), the norms taken per
matrix (the reference code took them over the whole batch, coupling the samples).

Segments: token i belongs to segment floor(i m / N), so when N is not divisible by m the segments
differ in length by at most one token and no padding enters any mean. With N <= m every token is its
own landmark and the result is exact softmax attention (once the pseudo-inverse has converged).
The depthwise convolution (kernel 33 along the token sequence, per head) is added in self-attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import ATTENTIONS
from .base import Grid, QKVAttention


def newton_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of each matrix in a (..., m, m) by Newton-Schulz iterations."""
    abs_a = a.abs()
    norm_1 = abs_a.sum(dim=-2).amax(dim=-1)  # max column sum, per matrix
    norm_inf = abs_a.sum(dim=-1).amax(dim=-1)  # max row sum, per matrix
    z = a.transpose(-2, -1) / (norm_1 * norm_inf)[..., None, None]
    identity = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


def segment_means(t: Tensor, num_segments: int) -> Tensor:
    """Means of `num_segments` contiguous, nearly equal segments along dim -2 of t (B, h, N, d)."""
    n = t.shape[-2]
    # Exported graphs keep n symbolic: they take the general route (the same means) for every n.
    if n % num_segments == 0 and not torch.compiler.is_exporting():
        return t.unflatten(-2, (num_segments, n // num_segments)).mean(dim=-2)
    segment = torch.arange(n, device=t.device) * num_segments // n
    counts = torch.bincount(segment, minlength=num_segments).to(t.dtype)
    sums = t.new_zeros(*t.shape[:-2], num_segments, t.shape[-1]).index_add(-2, segment, t)
    return sums / counts[:, None]


# Registered like every mechanism (decorator, class, its own options): that shared shape is on purpose.
@ATTENTIONS.register(
    "nystrom",
    description="Nystromformer: segment-mean landmarks, Newton pseudo-inverse, conv residual",
    time="O(N m d + m^3)",
    memory="O(N m)",
)
class NystromAttention(QKVAttention):
    """Nystrom approximation of softmax attention with m landmarks."""

    compute_in_float32 = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        conv_kernel: int | None = 33,
        **common: Any,
    ) -> None:
        super().__init__(dim, num_heads, **common)
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.residual_conv = None
        if conv_kernel:
            if conv_kernel % 2 == 0:
                raise ValueError(f"nystrom: conv_kernel must be odd to keep token positions; got {conv_kernel}")
            self.residual_conv = nn.Conv2d(
                num_heads, num_heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=num_heads, bias=False
            )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        scale = self.head_dim**-0.25
        q, k = q * scale, k * scale
        landmarks = min(self.num_landmarks, q.shape[-2], k.shape[-2])  # the same m for both: A is m x m
        q_landmarks, k_landmarks = segment_means(q, landmarks), segment_means(k, landmarks)
        kernel_1 = torch.softmax(q @ k_landmarks.transpose(-2, -1), dim=-1)  # (B, h, N, m)
        kernel_2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-2, -1), dim=-1)  # (B, h, m, m)
        kernel_3 = torch.softmax(q_landmarks @ k.transpose(-2, -1), dim=-1)  # (B, h, m, N)
        kernel_1 = nn.functional.dropout(kernel_1, self.attn_drop, self.training)
        # kernel_1 (N x m) meets the m x d product last: N m d multiplications instead of the N m^2 + N m d
        # of (kernel_1 @ pinv) @ (kernel_3 @ v), and backward keeps no N x m product of kernel_1 and pinv.
        return kernel_1 @ (newton_pinv(kernel_2, self.pinv_iterations) @ (kernel_3 @ v))

    def local_term(self, v: Tensor, hw: Grid | None) -> Tensor | None:
        return None if self.residual_conv is None else self.residual_conv(v)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}"
