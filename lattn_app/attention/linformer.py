"""Linformer attention (Wang et al.; the X-formers paper's "Linformer").

out = softmax(q (E k)^T / sqrt(d)) (F v) with learned projections E, F in R^{k x HW} that compress
the H*W grid keys and values to k rows (k = 64 by default), so the map is N x k.

Without RoPE, E and F compress the tokens before the key and value projections (the same result by
associativity, with far fewer FLOPs and no N x C keys and values); with RoPE the keys are rotated token
by token, so they are projected first.

E and F tie the layer to the grid it was built for (``grid_size``). Prefix tokens (class token) are not
projected: their keys and values join the k compressed rows, so every query still sees them directly.
On another grid, ``on_other_grid="resample"`` (default) bilinearly resamples E and F over (H, W) and
rescales them by (H*W)/(H'*W') so the compressed sums keep their magnitude (fine-tuning at a new
resolution works); ``on_other_grid="error"`` refuses other grids with the supported size named.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import ATTENTIONS
from .base import Grid, QKVAttention, autocast_off, check_grid_policy, num_prefix, resample_grid_weight


def compressed_rows(tokens: Tensor, projection: Tensor, prefix: int) -> Tensor:
    """[prefix tokens ; projection @ grid tokens] for tokens (B, N, C) and a projection (k, N - prefix)."""
    rows = projection @ tokens[:, prefix:]
    return torch.cat([tokens[:, :prefix], rows], dim=1) if prefix else rows


def row_weights(projection: Tensor, prefix: int) -> Tensor:
    """The weight of the bias in each compressed row once projected, as E (X W^T + 1 b^T) = (E X) W^T +
    (E 1) b^T: the sum of the projection's row (1 for a prefix token)."""
    weights = projection.sum(dim=1)
    return torch.cat([weights.new_ones(prefix), weights]) if prefix else weights


class ProjectQueriesAndCompressedRows(torch.autograd.Function):
    """(q, k, v) = (x W_q^T, K W_k^T, V W_v^T): the q, k and v row blocks of one (3C, C) weight applied to
    the query tokens x and to the compressed key and value rows K = [prefix ; E @ grid tokens of source]
    and V (the same with F), as one autograd node. Gradients flow to K and V (and on through the products
    that compressed them); source, E and F are passed so that K and V can be recomputed.

    Two choices keep its training memory down (at N=196, width 256: 0.98x the reference's peak, where
    autograd of three products of the weight's slices takes 1.20x and keeping K and V to the end 1.05x):
    - the backward pass writes the weight's gradient block by block into one tensor, where three slice
      products would form three block gradients and copy them into one;
    - it frees K and V as soon as their blocks are written. A later backward pass through a retained graph
      (``retain_graph=True``) recomputes them from source, E and F, which the compressing products keep.
    Where autocast is on it computes in autocast's dtype, as F.linear would.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, x: Tensor, key_rows: Tensor, value_rows: Tensor, source: Tensor,
                key_projection: Tensor, value_projection: Tensor, prefix: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.weight_dtype, ctx.prefix = weight.dtype, prefix
        ctx.input_dtypes = [t.dtype for t in (x, key_rows, value_rows)]
        inputs = (x, key_rows, value_rows)
        device_type = weight.device.type
        ctx.autocast_dtype = None  # autocast's dtype, where it is on: a recomputation runs under it
        if torch.is_autocast_enabled(device_type):
            ctx.autocast_dtype = torch.get_autocast_dtype(device_type)
            inputs = tuple(t.to(ctx.autocast_dtype) for t in inputs)
            weight = weight.to(ctx.autocast_dtype)
        with autocast_off(weight):
            outputs = tuple(F.linear(t, w) for t, w in zip(inputs, weight.chunk(3)))
        ctx.save_for_backward(weight, inputs[0], source, key_projection, value_projection)
        # Not saved with save_for_backward, which would hold them until the node is freed: this node is
        # their only holder, and the backward pass drops each once used.
        ctx.compressed_rows = list(inputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        weight, x, source, key_projection, value_projection = ctx.saved_tensors
        kept_rows, ctx.compressed_rows = ctx.compressed_rows, None  # None: this graph ran backward before

        def compressed_rows_again(projection: Tensor) -> Tensor:  # as the forward pass's caller did
            with torch.autocast(weight.device.type, dtype=ctx.autocast_dtype, enabled=ctx.autocast_dtype is not None):
                rows = compressed_rows(source, projection, ctx.prefix)
            return rows.to(weight.dtype)  # the dtype the forward pass multiplied in

        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = torch.empty(weight.shape, dtype=ctx.weight_dtype, device=weight.device)
            for index, (grad, block) in enumerate(zip(grads, grad_weight.chunk(3))):
                if index == 0:
                    tokens = x
                elif kept_rows is not None:
                    tokens = kept_rows.pop(0)  # its last reference: freed below, once its block is written
                else:
                    tokens = compressed_rows_again(key_projection if index == 1 else value_projection)
                if block.dtype == grad.dtype:
                    torch.mm(grad.flatten(0, -2).T, tokens.flatten(0, -2), out=block)
                else:  # computed in autocast's dtype; the gradient is in the weight's
                    block.copy_(grad.flatten(0, -2).T @ tokens.flatten(0, -2))
                del tokens
        del kept_rows
        grad_inputs = [
            (grad @ block).to(dtype) if needed else None
            for grad, block, dtype, needed in zip(grads, weight.chunk(3), ctx.input_dtypes, ctx.needs_input_grad[1:4])
        ]
        return (grad_weight, *grad_inputs, None, None, None, None)


# Registered like every mechanism (decorator, class, its own options): that shared shape is on purpose.
@ATTENTIONS.register(
    "linformer",
    description="Linformer: learned length-k projections of keys and values (built for one grid)",
    time="O(N k d)",
    memory="O(N k)",
)
class LinformerAttention(QKVAttention):
    """Linformer attention with shared-across-heads key and value projections."""

    needs_grid = True
    fixed_grid = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid_size: tuple[int, int] = (14, 14),
        k: int = 64,
        on_other_grid: str = "resample",
        **common: Any,
    ) -> None:
        super().__init__(dim, num_heads, **common)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.k = k
        self.on_other_grid = check_grid_policy(on_other_grid, "linformer")
        num_tokens = self.grid_size[0] * self.grid_size[1]
        self.key_projection = nn.Parameter(torch.randn(k, num_tokens) * k**-0.5)  # E
        self.value_projection = nn.Parameter(torch.randn(k, num_tokens) * k**-0.5)  # F

    def compress(self, t: Tensor, projection: Tensor, hw: Grid) -> Tensor:
        """[prefix tokens ; projection @ grid tokens] for per-head t (B, h, N, d): the RoPE path, whose keys
        and values are projected (and rotated) before they are compressed."""
        heads, head_dim = t.shape[1], t.shape[-1]
        tokens = t.transpose(1, 2).flatten(2)
        prefix = num_prefix(tokens.shape[1], hw)
        rows = compressed_rows(tokens, self.grid_projection(projection, hw, tokens.dtype), prefix)
        return rows.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    def mix(self, x: Tensor, hw: Grid | None, context: Tensor | None, context_hw: Grid | None) -> Tensor:
        """Keys and values compressed before they are projected: E (X W^T + 1 b^T) = (E X) W^T + (E 1) b^T,
        so k rows are projected instead of N (about 40% fewer FLOPs at width 256, and no N x C key and
        value tensors). With RoPE the keys are rotated token by token first, so they are projected first."""
        if self.rope is not None:
            return super().mix(x, hw, context, context_hw)
        source, source_hw = (x, hw) if context is None else (context, context_hw)
        assert source_hw is not None  # needs_grid
        prefix = num_prefix(source.shape[1], source_hw)
        key_projection = self.grid_projection(self.key_projection, source_hw, source.dtype)
        value_projection = self.grid_projection(self.value_projection, source_hw, source.dtype)
        key_rows = compressed_rows(source, key_projection, prefix)
        value_rows = compressed_rows(source, value_projection, prefix)
        q, k, v = ProjectQueriesAndCompressedRows.apply(self.qkv.weight, x, key_rows, value_rows, source,
                                                        key_projection, value_projection, prefix)
        if self.qkv.bias is not None:
            bias_q, bias_k, bias_v = self.qkv.bias.split(self.dim)
            q = q + bias_q.to(q.dtype)
            k = k + (row_weights(key_projection, prefix).unsqueeze(-1) * bias_k).to(k.dtype)
            v = v + (row_weights(value_projection, prefix).unsqueeze(-1) * bias_v).to(v.dtype)
        out = F.scaled_dot_product_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))

    def grid_projection(self, projection: Tensor, hw: Grid, dtype: torch.dtype) -> Tensor:
        """E or F for the grid hw (resampled where hw is not grid_size; see the module docstring), in dtype."""
        return resample_grid_weight(
            projection, self.grid_size, hw, grid_dim=1, preserve_sum=True,
            mechanism="linformer", policy=self.on_other_grid,
        ).to(dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        assert kv_hw is not None  # needs_grid
        k = self.compress(k, self.key_projection, kv_hw)
        v = self.compress(v, self.value_projection, kv_hw)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid_size={self.grid_size}, k={self.k}, on_other_grid={self.on_other_grid}"
