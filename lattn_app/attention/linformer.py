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

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import ATTENTIONS
from .base import Grid, QKVAttention, autocast_off, check_grid_policy, num_prefix, resample_grid_weight


class RowBlockLinear(torch.autograd.Function):
    """``outputs[i] = F.linear(inputs[i], weight_blocks[i])`` for the equal row blocks of one weight (its
    q, k and v rows), as one autograd node whose backward pass writes the weight's gradient block by
    block into one tensor. Autograd of three products of the weight's slices would form three block
    gradients and then copy them into one (at N=196, width 256: 1.20x the reference's training peak
    memory instead of 1.05x).
    Where autocast is on it computes in autocast's dtype, as F.linear would.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.weight_dtype, ctx.input_dtypes = weight.dtype, [t.dtype for t in inputs]
        device_type = weight.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            inputs = tuple(t.to(dtype) for t in inputs)
            weight = weight.to(dtype)
        with autocast_off(weight):
            outputs = tuple(F.linear(t, w) for t, w in zip(inputs, weight.chunk(len(inputs))))
        ctx.save_for_backward(weight, *inputs)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        weight, *inputs = ctx.saved_tensors
        blocks = weight.chunk(len(grads))
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = torch.empty(weight.shape, dtype=ctx.weight_dtype, device=weight.device)
            for grad, tokens, block in zip(grads, inputs, grad_weight.chunk(len(grads))):
                if block.dtype == grad.dtype:
                    torch.mm(grad.flatten(0, -2).T, tokens.flatten(0, -2), out=block)
                else:  # computed in autocast's dtype; the gradient is in the weight's
                    block.copy_(grad.flatten(0, -2).T @ tokens.flatten(0, -2))
        grad_inputs = [
            (grad @ block).to(dtype) if needed else None
            for grad, block, dtype, needed in zip(grads, blocks, ctx.input_dtypes, ctx.needs_input_grad[1:])
        ]
        return (grad_weight, *grad_inputs)


@ATTENTIONS.register(
    "linformer",
    description="Linformer: learned length-k projections of keys and values (built for one grid)",
    time="O(N k d)",
    memory="O(N k)",
)
class LinformerAttention(QKVAttention):
    """Linformer attention with shared-across-heads key and value projections."""

    supports_rope = True
    supports_cross_attention = True
    needs_grid = True
    fixed_grid = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid_size: tuple[int, int] = (14, 14),
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rope: bool = False,
        rope_base: float = 100.0,
        k: int = 64,
        on_other_grid: str = "resample",
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, rope, rope_base)
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
        rows, _ = self.compress_tokens(t.transpose(1, 2).flatten(2), hw, projection)
        return rows.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    def mix(self, x: Tensor, hw: Grid | None, context: Tensor | None, context_hw: Grid | None) -> Tensor:
        """Keys and values compressed before they are projected: E (X W^T + 1 b^T) = (E X) W^T + (E 1) b^T,
        so k rows are projected instead of N (about 40% fewer FLOPs at width 256, and no N x C key and
        value tensors). With RoPE the keys are rotated token by token first, so they are projected first."""
        if self.rope is not None:
            return super().mix(x, hw, context, context_hw)
        source, source_hw = (x, hw) if context is None else (context, context_hw)
        assert source_hw is not None  # needs_grid
        key_rows, key_row_weights = self.compress_tokens(source, source_hw, self.key_projection)
        value_rows, value_row_weights = self.compress_tokens(source, source_hw, self.value_projection)
        q, k, v = RowBlockLinear.apply(self.qkv.weight, x, key_rows, value_rows)
        if self.qkv.bias is not None:
            bias_q, bias_k, bias_v = self.qkv.bias.split(self.dim)
            q = q + bias_q.to(q.dtype)
            k = k + (key_row_weights.unsqueeze(-1) * bias_k).to(k.dtype)
            v = v + (value_row_weights.unsqueeze(-1) * bias_v).to(v.dtype)
        out = F.scaled_dot_product_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))

    def compress_tokens(self, tokens: Tensor, hw: Grid, projection: Tensor) -> tuple[Tensor, Tensor]:
        """[prefix tokens ; projection @ grid tokens] for tokens (B, N, C), and the weight of the bias in
        each of these rows once projected: the row's sum of the projection (1 for a prefix token)."""
        prefix = num_prefix(tokens.shape[1], hw)
        projection = resample_grid_weight(
            projection, self.grid_size, hw, grid_dim=1, preserve_sum=True,
            mechanism="linformer", policy=self.on_other_grid,
        ).to(tokens.dtype)
        rows, row_weights = projection @ tokens[:, prefix:], projection.sum(dim=1)
        if prefix:
            rows = torch.cat([tokens[:, :prefix], rows], dim=1)
            row_weights = torch.cat([row_weights.new_ones(prefix), row_weights])
        return rows, row_weights

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        assert kv_hw is not None  # needs_grid
        k = self.compress(k, self.key_projection, kv_hw)
        v = self.compress(v, self.value_projection, kv_hw)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid_size={self.grid_size}, k={self.k}, on_other_grid={self.on_other_grid}"
