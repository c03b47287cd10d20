"""CARE linear attention (CARE Transformer; Zhou et al.; CVPR 2025), the token mixer of its stages 3-4.

With phi(x) = ELU(x) + 1:
    kv  = sum_j phi(k_j) v_j^T / N                     (d x d per head)
    z_i = 1 / (phi(q_i) . mean_j phi(k_j) + 1e-6)
    out_i = (phi(q_i)^T kv) z_i
The CARE block feeds its attention branch's channels straight in as v and has no output projection:
``value_projection=False`` and ``output_projection=False`` reproduce that (q and k then come from one
linear layer of 2*dim outputs). The asymmetric channel decoupling, dynamic memory and dual interaction
belong to the CARE backbone. Context and normaliser are computed in fp32 under autocast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import ATTENTIONS
from .base import Grid, QKVAttention, fused_projection_pays

EPSILON = 1e-6


# Registered like every mechanism (decorator, class, its own options): that shared shape is on purpose.
@ATTENTIONS.register(
    "care",
    description="CARE linear attention: ELU+1 feature map, normalised by phi(q) . mean phi(k)",
    time="O(N d^2)",
    memory="O(d^2)",
)
class CareAttention(QKVAttention):
    """ELU+1 normalised linear attention of the CARE Transformer."""

    compute_in_float32 = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        value_projection: bool = True,
        output_projection: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(dim, num_heads, **common)
        self.value_projection = value_projection
        if not value_projection:
            self.qkv = nn.Linear(dim, 2 * dim, bias=self.qkv.bias is not None)  # q and k only; v is the input itself
        if not output_projection:
            self.proj = nn.Identity()

    def project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.value_projection:
            return super().project(x, context)
        if context is None and fused_projection_pays(x, self.qkv.weight):  # see QKVAttention.project
            q, k = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(2, dim=-1)
            return self.split_heads(q), self.split_heads(k), self.split_heads(x)
        source = x if context is None else context
        weights = self.qkv.weight.split(self.dim)  # split once: see QKVAttention.project
        biases = (None, None) if self.qkv.bias is None else self.qkv.bias.split(self.dim)
        q = F.linear(x, weights[0], biases[0])
        k = F.linear(source, weights[1], biases[1])
        return self.split_heads(q), self.split_heads(k), self.split_heads(source)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        # add_ in place: ELU's backward needs its input, not its output, so this saves a copy safely.
        phi_q, phi_k = F.elu(q).add_(1), F.elu(k).add_(1)
        num_keys = k.shape[-2]
        # Small element-wise steps in place (safe for autograd: a product's backward needs its inputs, and
        # reciprocal's its output): ~5% of a call at N=196, where each new tensor costs several us.
        kv = (phi_k.transpose(-2, -1) @ v).div_(num_keys)  # (B, h, d, d); dividing it, not v, saves an N x d copy
        kv = F.dropout(kv, self.attn_drop, self.training)
        mean_phi_k = phi_k.mean(dim=-2).unsqueeze(-1)
        del phi_k  # without autograd, freed before the output is formed (lower peak memory)
        z = (phi_q @ mean_phi_k).add_(EPSILON).reciprocal_()  # (B, h, N, 1)
        out = phi_q @ kv
        # Without autograd, scaled in place (one N x d tensor less at the peak); with it, the product's
        # value is needed for z's gradient.
        return out.mul_(z) if not torch.is_grad_enabled() else out * z
