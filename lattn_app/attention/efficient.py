"""Efficient Attention (Shen, Zhang, Zhao, Yi, Li; WACV 2021): linear complexity via associativity.

E(q, k, v) = rho_q(q) (rho_k(k)^T v), evaluated right to left: the per-head context
rho_k(k)^T v is a d x d matrix, so nothing N x N is ever formed (time O(N d^2), extra memory O(d^2)).

- ``normalization="softmax"`` (the paper's default): rho_q is a softmax over the d channels of each
  query, rho_k a softmax over the N positions of each key channel. Every implied attention row then sums
  to 1. ``temperature=True`` multiplies q and k by d^-1/4 first, the analogue of softmax attention's
  1/sqrt(d) (endorsed by the author in the reference repository's issue #5; off in the paper).
- ``normalization="scaling"``: rho_q(y) = rho_k(y) = y / sqrt(N); the result equals dot-product
  attention without softmax, q k^T v / N, exactly.

It pays off when N >> d (at 16 x 16 maps it saves nothing). The context and the softmax over N
positions are computed in fp32 under autocast.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from ..registry import ATTENTIONS, check_choice
from .base import Grid, QKVAttention

NORMALIZATIONS = ("softmax", "scaling")


@ATTENTIONS.register(
    "efficient",
    description="Efficient Attention (Shen et al.): softmax-normalised q, k; d x d context first",
    time="O(N d^2)",
    memory="O(d^2)",
)
class EfficientAttention(QKVAttention):
    """Efficient Attention with softmax or scaling normalisation."""

    supports_rope = True
    supports_cross_attention = True
    compute_in_float32 = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rope: bool = False,
        rope_base: float = 100.0,
        normalization: str = "softmax",
        temperature: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, rope, rope_base)
        self.normalization = check_choice("efficient attention: normalization", normalization, NORMALIZATIONS)
        self.temperature = temperature

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        if self.normalization == "softmax":
            if self.temperature:
                q, k = q * self.head_dim**-0.25, k * self.head_dim**-0.25
            q = q.softmax(dim=-1)  # over the d channels of each query
            k = k.softmax(dim=-2)  # over the N positions of each key channel
        else:
            num_keys = k.shape[-2]
            q, k = q * num_keys**-0.5, k * num_keys**-0.5
        context = k.transpose(-2, -1) @ v  # (B, h, d, d): the only "attention" state
        context = F.dropout(context, self.attn_drop, self.training)
        return q @ context

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalization={self.normalization}, temperature={self.temperature}"
