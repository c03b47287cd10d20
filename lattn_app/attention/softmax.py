"""Softmax attention, the baseline every other mechanism is measured against.

out = softmax(q k^T / sqrt(d)) v. By default PyTorch's fused ``scaled_dot_product_attention`` computes it
without materialising the N x N map (flash / memory-efficient kernels, fp32 accumulation). With
``fused=False`` the N x N map is built explicitly: the "regular Transformer" of the papers' memory
comparisons, kept for benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..registry import ATTENTIONS
from .base import Grid, QKVAttention


@ATTENTIONS.register(
    "softmax",
    description="Exact softmax attention (fused scaled_dot_product_attention; fused=False materialises N x N)",
    time="O(N^2 d)",
    memory="O(N) fused, O(N^2) materialised",
)
class SoftmaxAttention(QKVAttention):
    """Exact multi-head softmax attention."""


    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        fused: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(dim, num_heads, **common)
        self.fused = fused

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        dropout = self.attn_drop if self.training else 0.0
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        attn = torch.softmax((q * self.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
        return F.dropout(attn, dropout, self.training) @ v
