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
the module. It works through the tokens in chunks of at most ``CHUNK_ROWS`` rows, so that softmax(k) and
softmax(q) never exist whole: the temporaries stay in cache and the extra memory is O(chunk x d) instead
of O(N d). With autograd its backward pass (:class:`_SoftmaxEfficientAttention`) is written out and
chunked the same way: it keeps only q, k, v, the d x d context and the key softmax's column maxima and
sums, and recomputes the two softmaxes chunk by chunk. With context dropout in training it falls back to
the plain formula under autograd.
"""

from __future__ import annotations

from typing import Any

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from ..registry import ATTENTIONS, check_choice
from .base import Grid, QKVAttention

NORMALIZATIONS = ("softmax", "scaling")
CHUNK_ROWS = 1024  # the most rows per chunk: ~1 MB temporaries at d = 64, 4 heads (cache-sized)
# The backward pass holds three N x d gradients besides q, k, v: it cuts even few tokens into 4 chunks, so
# that its temporaries are a quarter of q's size, not all of it (the forward pass is faster in one piece).
BACKWARD_MIN_CHUNKS = 4


def chunk_rows(tokens: int, min_chunks: int = 1) -> int:
    """Rows per chunk for `tokens` rows: at most CHUNK_ROWS, and few enough for `min_chunks` chunks."""
    return max(1, min(CHUNK_ROWS, math.ceil(tokens / min_chunks)))


def softmax_key_context(k: Tensor, v: Tensor, column_max: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(k over the N positions)^T v for k, v (B, h, N, d), without autograd.

    softmax over positions = exp(k - column max) / column sum: one chunk of rows is exponentiated at a
    time, and both the context and the column sums are accumulated (in fp32 for half-precision inputs).
    Returns the (B, h, d, d) context (accumulation dtype) and the column sums (B, h, 1, d).
    """
    if column_max is None:
        column_max = k.amax(dim=-2, keepdim=True)
    accumulate = torch.promote_types(v.dtype, torch.float32)
    context = k.new_zeros(*k.shape[:-2], k.shape[-1], v.shape[-1], dtype=accumulate)
    column_sum = k.new_zeros(*k.shape[:-2], 1, k.shape[-1], dtype=accumulate)
    rows = chunk_rows(k.shape[-2])
    for k_rows, v_rows in zip(k.split(rows, dim=-2), v.split(rows, dim=-2)):
        weights = (k_rows - column_max).exp_().to(accumulate)
        context.add_(weights.transpose(-2, -1) @ v_rows.to(accumulate))
        column_sum.add_(weights.sum(dim=-2, keepdim=True))
    return context.div_(column_sum.transpose(-2, -1)), column_sum


def softmax_query_output(q: Tensor, context: Tensor) -> Tensor:
    """softmax(q over its d channels) @ context for q (B, h, N, d) and context (B, h, d, d), chunked."""
    out = q.new_empty(*q.shape[:-1], context.shape[-1])
    context = context.to(q.dtype)
    rows = chunk_rows(q.shape[-2])
    for q_rows, out_rows in zip(q.split(rows, dim=-2), out.split(rows, dim=-2)):
        torch.matmul(q_rows.softmax(dim=-1), context, out=out_rows)
    return out


class _SoftmaxEfficientAttention(torch.autograd.Function):
    """rho_q(q) (rho_k(k)^T v) with softmax normalisation and a hand-written, chunked backward pass.

    With ks = softmax_N(k), C = ks^T v, qs = softmax_d(q), out = qs C and g = dL/dout:
        dC = qs^T g,   dq = qs * (g C^T - rowsum(qs * g C^T)),
        dv = ks dC,    dk = ks * (v dC^T - t),   t_i = sum_n ks_ni (v dC^T)_ni = sum_j dC_ij C_ij,
    so the column term t of the key softmax's backward needs no pass over the tokens. Two passes over
    chunks of rows (q with g, then k with v) recompute qs and ks; nothing of size N x d is kept but the
    inputs and written but the gradients.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # noqa: D102
        column_max = k.amax(dim=-2, keepdim=True)
        context, column_sum = softmax_key_context(k, v, column_max)
        ctx.save_for_backward(q, k, v, column_max, column_sum, context)
        return softmax_query_output(q, context)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: D102
        q, k, v, column_max, column_sum, context = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        accumulate = context.dtype
        grad_q = torch.empty_like(q) if need_q else None
        grad_context = context.new_zeros(context.shape)
        context_t = context.transpose(-2, -1).to(q.dtype)
        rows = chunk_rows(q.shape[-2], BACKWARD_MIN_CHUNKS)
        chunks = zip(q.split(rows, dim=-2), grad_out.split(rows, dim=-2),
                     grad_q.split(rows, dim=-2) if need_q else [None] * math.ceil(q.shape[-2] / rows))
        for q_rows, g_rows, grad_q_rows in chunks:
            weights = q_rows.softmax(dim=-1)
            grad_context.add_(weights.transpose(-2, -1).to(accumulate) @ g_rows.to(accumulate))
            if grad_q_rows is not None:
                grad_weights = torch.matmul(g_rows, context_t, out=grad_q_rows)
                grad_weights.sub_((grad_weights * weights).sum(dim=-1, keepdim=True)).mul_(weights)
        if not (need_k or need_v):
            return grad_q, None, None
        column_term = (grad_context * context).sum(dim=-1).unsqueeze(-2).to(k.dtype)  # t: (B, h, 1, d)
        grad_context_v = grad_context.to(v.dtype)
        grad_context_t = grad_context.transpose(-2, -1).to(v.dtype)
        scale = column_sum.reciprocal().to(k.dtype)
        grad_k = torch.empty_like(k) if need_k else None
        grad_v = torch.empty_like(v) if need_v else None
        rows = chunk_rows(k.shape[-2], BACKWARD_MIN_CHUNKS)
        for start in range(0, k.shape[-2], rows):
            part = slice(start, start + rows)
            weights = (k[..., part, :] - column_max).exp_().mul_(scale)  # ks of these rows
            if need_v:
                torch.matmul(weights, grad_context_v, out=grad_v[..., part, :])
            if need_k:
                grad_k_rows = torch.matmul(v[..., part, :], grad_context_t, out=grad_k[..., part, :])
                grad_k_rows.sub_(column_term).mul_(weights)
        return grad_q, grad_k, grad_v


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
    if context_dropout > 0 and training:  # the plain formula, differentiated by autograd
        context = k.softmax(dim=-2).transpose(-2, -1) @ v
        return q.softmax(dim=-1) @ F.dropout(context, context_dropout, training)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        # torch.compile, torch.export (and the ONNX exporter on top of it): the same formula in one piece.
        # The chunk count depends on N, which an exported graph keeps symbolic; the chunks write through
        # non-contiguous out= views, which break a compiled graph; and inductor fuses the two softmaxes
        # into the products itself, its partitioner choosing what the backward pass keeps or recomputes.
        accumulate = torch.promote_types(v.dtype, torch.float32)
        context = k.softmax(dim=-2).to(accumulate).transpose(-2, -1) @ v.to(accumulate)
        return q.softmax(dim=-1) @ context.to(q.dtype)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SoftmaxEfficientAttention.apply(q, k, v)
    context, _ = softmax_key_context(k, v)
    return softmax_query_output(q, context)


# Registered like every mechanism (decorator, class, its own options): that shared shape is on purpose.
@ATTENTIONS.register(
    "efficient",
    description="Efficient Attention (Shen et al.): softmax-normalised q, k; d x d context first",
    time="O(N d^2)",
    memory="O(d^2)",
)
class EfficientAttention(QKVAttention):
    """Efficient Attention with softmax or scaling normalisation."""

    compute_in_float32 = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        normalization: str = "softmax",
        temperature: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(dim, num_heads, **common)
        self.normalization = check_choice("efficient attention: normalization", normalization, NORMALIZATIONS)
        self.temperature = temperature

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        return efficient_attention(q, k, v, self.normalization, self.temperature, self.attn_drop, self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalization={self.normalization}, temperature={self.temperature}"
