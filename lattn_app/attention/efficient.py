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

:func:`efficient_attention` is the operation alone (given per-head q, k, v), without the projections of
the module. Without autograd (inference) it works through the tokens in chunks of ``CHUNK_ROWS`` rows,
so that softmax(k) and softmax(q) never exist whole: the temporaries stay in cache and the extra memory
is O(chunk x d) instead of O(N d). With autograd it is the plain formula, whose saved tensors the
backward pass needs anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..registry import ATTENTIONS, check_choice
from .base import Grid, QKVAttention

NORMALIZATIONS = ("softmax", "scaling")
CHUNK_ROWS = 1024  # rows per chunk without autograd: ~1 MB temporaries at d = 64, 4 heads (cache-sized)


def _tracks_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def softmax_key_context(k: Tensor, v: Tensor) -> Tensor:
    """softmax(k over the N positions)^T v: the (B, h, d, d) context of k, v (B, h, N, d)."""
    if _tracks_grad(k, v):
        return k.softmax(dim=-2).transpose(-2, -1) @ v
    # softmax over positions = exp(k - column max) / column sum: exponentiate one chunk of rows at a
    # time and accumulate both the context and the column sums (in fp32 for half-precision inputs).
    column_max = k.amax(dim=-2, keepdim=True)
    accumulate = torch.promote_types(v.dtype, torch.float32)
    context = k.new_zeros(*k.shape[:-2], k.shape[-1], v.shape[-1], dtype=accumulate)
    column_sum = k.new_zeros(*k.shape[:-2], k.shape[-1], 1, dtype=accumulate)
    for k_rows, v_rows in zip(k.split(CHUNK_ROWS, dim=-2), v.split(CHUNK_ROWS, dim=-2)):
        weights = (k_rows - column_max).exp_()
        context += weights.transpose(-2, -1) @ v_rows
        column_sum += weights.sum(dim=-2).unsqueeze(-1)
    return (context / column_sum).to(v.dtype)


def softmax_query_output(q: Tensor, context: Tensor) -> Tensor:
    """softmax(q over its d channels) @ context for q (B, h, N, d) and context (B, h, d, d)."""
    if _tracks_grad(q, context):
        return q.softmax(dim=-1) @ context
    out = q.new_empty(*q.shape[:-1], context.shape[-1])
    for q_rows, out_rows in zip(q.split(CHUNK_ROWS, dim=-2), out.split(CHUNK_ROWS, dim=-2)):
        torch.matmul(q_rows.softmax(dim=-1), context, out=out_rows)
    return out


def efficient_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalization: str = "softmax",
    temperature: bool = False,
    context_dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Efficient Attention E(q, k, v) = rho_q(q) (rho_k(k)^T v) on per-head tensors, without projections.

    q is (B, h, Nq, d), k and v are (B, h, Nk, d); returns (B, h, Nq, d). `normalization` is "softmax"
    (the paper's default) or "scaling" (equal to q k^T v / Nk); `temperature` scales q and k by d^-1/4
    before the softmaxes; `context_dropout` is applied to the d x d context when `training`.
    """
    if normalization == "scaling":
        num_keys = k.shape[-2]
        context = (k * num_keys**-0.5).transpose(-2, -1) @ v  # (B, h, d, d): the only "attention" state
        return (q * num_keys**-0.5) @ F.dropout(context, context_dropout, training)
    if normalization != "softmax":
        raise ValueError(f"efficient attention: normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
    if temperature:
        q, k = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25
    context = softmax_key_context(k, v)
    return softmax_query_output(q, F.dropout(context, context_dropout, training))


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
        return efficient_attention(q, k, v, self.normalization, self.temperature, self.attn_drop, self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalization={self.normalization}, temperature={self.temperature}"
