"""Linformer attention (Wang et al.; the X-formers paper's "Linformer").

out = softmax(q (E k)^T / sqrt(d)) (F v) with learned projections E, F in R^{k x HW} that compress
the H*W grid keys and values to k rows (k = 64 by default), so the map is N x k.

Sharing of the length projections (``sharing``), the Linformer paper's modes (Sec. 4):
- ``"headwise"`` (default): one E and one F shared by all heads of the layer;
- ``"key-value"``: additionally E = F, one projection for keys and values;
- ``"layerwise"``: one E for keys and values of every layer built together (the backbones build a
  network's, or a stage's, layers with one set of options and they then share it; a layer built on
  its own has its own E, as in "key-value").
Two options of the released code (lucidrains' ``linformer``, which the X-formers' ViL uses):
- ``one_kv_head=True``: keys and values have one head of size d, shared by all query heads (the key and
  value projections map C -> d instead of C -> C);
- ``share_kv=True``: the values are the keys (one projection W_k = W_v, and E = F; needs sharing
  "key-value" or "layerwise").
The X-formers' ViL (their CIFAR script and the package's default) is ``sharing="key-value",
one_kv_head=True, share_kv=True, project_prefix=True, qkv_bias=False``: 53,376 parameters per layer at
width 128, N = 256, k = 64, where the default layout has 98,432 (without q/k/v bias).

Prefix tokens (class token): by default they are not projected: their keys and values join the k
compressed rows, so every query still sees them directly. ``project_prefix=True`` compresses them with
the grid tokens, as the reference does (its E has N = prefix + H*W columns).

Without RoPE, and in the default layout, E and F compress the tokens before the key and value
projections (the same result by associativity, with far fewer FLOPs and no N x C keys and values); with
RoPE the keys are rotated token by token, so they are projected first. In the reference's layouts
(``one_kv_head``, ``share_kv``, ``project_prefix``) the same algebra runs in plain autograd; with
``share_kv`` and RoPE the values are the keys before rotation, as in the X-formers' ViLRoPE.

E and F tie the layer to the grid it was built for (``grid_size``). On another grid,
``on_other_grid="resample"`` (default) bilinearly resamples the grid columns of E and F over (H, W) and
rescales them by (H*W)/(H'*W') so the compressed sums keep their magnitude (fine-tuning at a new
resolution works); ``on_other_grid="error"`` refuses other grids with the supported size named (the
reference accepts shorter sequences by truncating E, which has no meaning on a grid).

Initialisation: E and F are N(0, 1/k) (the reference draws them uniformly in +-k^-1/2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import ATTENTIONS, check_choice
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
    """Linformer attention: learned length projections of keys and values, shared across heads (see the
    module docstring for the sharing modes and the reference's layouts)."""

    needs_grid = True
    fixed_grid = True

    SHARING = ("headwise", "key-value", "layerwise")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid_size: tuple[int, int] = (14, 14),
        k: int = 64,
        on_other_grid: str = "resample",
        sharing: str = "headwise",
        one_kv_head: bool = False,
        share_kv: bool = False,
        project_prefix: bool = False,
        num_prefix_tokens: int = 0,
        layer_shared: dict | None = None,
        **common: Any,
    ) -> None:
        """`layer_shared` is set by the backbones (``mixer_options``): one dict for all layers built
        together, which holds the E of ``sharing="layerwise"``; leave it unset."""
        super().__init__(dim, num_heads, **common)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.k = k
        self.on_other_grid = check_grid_policy(on_other_grid, "linformer")
        self.sharing = check_choice("linformer: sharing", sharing, self.SHARING)
        if share_kv and sharing == "headwise":
            raise ValueError("linformer: share_kv=True (values are the keys) needs one projection E = F: "
                             "use sharing='key-value' or 'layerwise'")
        self.one_kv_head, self.share_kv, self.project_prefix = one_kv_head, share_kv, project_prefix
        self.num_prefix_tokens = num_prefix_tokens if project_prefix else 0
        self.kv_heads = 1 if one_kv_head else num_heads
        self.kv_width = self.kv_heads * self.head_dim
        if one_kv_head or share_kv:  # the reference's layout: q (C), then k (kv_width) and v (unless shared)
            widths = dim + self.kv_width * (1 if share_kv else 2)
            self.qkv = nn.Linear(dim, widths, bias=self.qkv.bias is not None)
        num_columns = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        if sharing == "layerwise" and layer_shared is not None:
            key = ("linformer.E", k, num_columns)
            if key not in layer_shared:
                layer_shared[key] = nn.Parameter(torch.randn(k, num_columns) * k**-0.5)
            self.key_projection = layer_shared[key]  # the same Parameter in every layer of the set
        else:
            self.key_projection = nn.Parameter(torch.randn(k, num_columns) * k**-0.5)  # E
        if sharing == "headwise":
            self.value_projection = nn.Parameter(torch.randn(k, num_columns) * k**-0.5)  # F
        # The autograd-function route needs the default (3C, C) layout and unprojected prefix tokens.
        self.fused_route = not (one_kv_head or share_kv or project_prefix)

    @property
    def value_length_projection(self) -> Tensor:
        """F (E itself unless sharing is "headwise")."""
        return self.value_projection if self.sharing == "headwise" else self.key_projection

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
        if not self.fused_route:
            return self.mix_reference_layout(x, hw, context, context_hw)
        if self.rope is not None:
            return super().mix(x, hw, context, context_hw)
        source, source_hw = (x, hw) if context is None else (context, context_hw)
        assert source_hw is not None  # needs_grid
        prefix = num_prefix(source.shape[1], source_hw)
        key_projection = self.grid_projection(self.key_projection, source_hw, source.dtype)
        value_projection = self.grid_projection(self.value_length_projection, source_hw, source.dtype)
        key_rows = compressed_rows(source, key_projection, prefix)
        value_rows = compressed_rows(source, value_projection, prefix)
        if torch.compiler.is_compiling():  # the Function frees K and V through ctx, a side effect a graph cannot hold
            q, k, v = (F.linear(t, w) for t, w in zip((x, key_rows, value_rows), self.qkv.weight.chunk(3)))
        else:
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

    def mix_reference_layout(self, x: Tensor, hw: Grid | None, context: Tensor | None,
                             context_hw: Grid | None) -> Tensor:
        """The layouts of the released code (one_kv_head, share_kv, project_prefix), in plain autograd."""
        source, source_hw = (x, hw) if context is None else (context, context_hw)
        assert source_hw is not None  # needs_grid
        prefix = num_prefix(source.shape[1], source_hw)
        if self.project_prefix and prefix != self.num_prefix_tokens:
            raise ValueError(f"linformer: built to project {self.num_prefix_tokens} prefix tokens with the grid "
                             f"(project_prefix=True); got {prefix}")
        kept = 0 if self.project_prefix else prefix  # prefix tokens passed through uncompressed
        widths = [self.dim, self.kv_width] + ([] if self.share_kv else [self.kv_width])
        weights = self.qkv.weight.split(widths)
        biases = [None] * len(widths) if self.qkv.bias is None else self.qkv.bias.split(widths)
        key_projection = self.grid_projection(self.key_projection, source_hw, source.dtype)
        value_projection = self.grid_projection(self.value_length_projection, source_hw, source.dtype)
        q = self.split_heads(F.linear(x, weights[0], biases[0]))
        if self.rope is None:  # compress first: E (X W^T + 1 b^T) = (E X) W^T + (E 1) b^T
            def projected(index: int, projection: Tensor) -> Tensor:
                rows = F.linear(compressed_rows(source, projection, kept), weights[index])
                if biases[index] is not None:
                    rows = rows + row_weights(projection, kept).unsqueeze(-1) * biases[index]
                return rows

            k = projected(1, key_projection)
            v = k if self.share_kv else projected(2, value_projection)
        else:  # keys are rotated token by token, so they are projected before they are compressed
            q = self.rope(q, hw)
            keys = F.linear(source, weights[1], biases[1])
            values = keys if self.share_kv else F.linear(source, weights[2], biases[2])  # unrotated keys
            keys = self.rope(keys.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2), source_hw)
            keys = keys.transpose(1, 2).flatten(2)
            k = compressed_rows(keys, key_projection, kept)
            v = compressed_rows(values, value_projection, kept)

        def heads(t: Tensor) -> Tensor:  # (B, rows, kv_heads d) -> (B, heads, rows, d), one head shared
            t = t.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
            return t.expand(-1, self.num_heads, -1, -1) if self.kv_heads != self.num_heads else t

        out = F.scaled_dot_product_attention(q, heads(k), heads(v), dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))

    def grid_projection(self, projection: Tensor, hw: Grid, dtype: torch.dtype) -> Tensor:
        """E or F for the grid hw (its grid columns resampled where hw is not grid_size; see the module
        docstring), in dtype. Columns of projected prefix tokens (project_prefix) are kept as they are."""
        prefix = self.num_prefix_tokens
        grid = resample_grid_weight(
            projection[:, prefix:], self.grid_size, hw, grid_dim=1, preserve_sum=True,
            mechanism="linformer", policy=self.on_other_grid,
        )
        return (torch.cat([projection[:, :prefix], grid], dim=1) if prefix else grid).to(dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        assert kv_hw is not None  # needs_grid
        k = self.compress(k, self.key_projection, kv_hw)
        v = self.compress(v, self.value_length_projection, kv_hw)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, grid_size={self.grid_size}, k={self.k}, on_other_grid={self.on_other_grid}, "
                f"sharing={self.sharing}, one_kv_head={self.one_kv_head}, share_kv={self.share_kv}, "
                f"project_prefix={self.project_prefix}")
