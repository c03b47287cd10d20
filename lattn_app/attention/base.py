"""What every token mixer shares: the forward contract, shape checks, q/k/v projections, RoPE.

Contract (docs/architecture.md#token-mixer-contract): ``mixer(x, hw)`` with tokens ``x`` of shape
(B, N, C) whose last H*W tokens lie on the ``hw = (H, W)`` grid in row-major order and whose first
``N - H*W`` tokens are prefix tokens (class token, register tokens); returns (B, N, C). Mechanisms that
allow it take a second token set ``context`` (B, M, C) with its grid ``context_hw`` for cross-attention:
queries from ``x``, keys and values from ``context``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import check_choice
from .rope import build_rope

Grid = tuple[int, int]


def check_tokens(x: Tensor, hw: Grid | None, what: str = "x") -> None:
    """Raise a ValueError unless x is (B, N, C) and the grid hw fits into its N tokens."""
    if x.dim() != 3:
        raise ValueError(f"{what} must be tokens of shape (B, N, C); got shape {tuple(x.shape)}")
    if hw is None:
        return
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"the grid of {what} must be (H, W) with H, W >= 1; got {hw}")
    if hw[0] * hw[1] > x.shape[1]:
        raise ValueError(
            f"grid {tuple(hw)} of {what} has {hw[0] * hw[1]} tokens but {what} has only "
            f"{x.shape[1]} (shape {tuple(x.shape)})"
        )


def as_grid(hw) -> Grid:
    """(H, W) as Python integers (from tensors, numpy integers, ...); symbolic sizes stay symbolic.

    int() of a torch.SymInt (a size while torch.export / torch.compile traces) would fix the traced
    graph to the example's grid, so an exported model would be wrong at every other image size.
    """
    def size(value) -> int:
        return value if isinstance(value, (int, torch.SymInt)) else int(value)

    return (size(hw[0]), size(hw[1]))


def num_prefix(num_tokens: int, hw: Grid | None) -> int:
    """Tokens before the grid; with no grid every token counts as a plain (non-grid) token."""
    return 0 if hw is None else num_tokens - hw[0] * hw[1]


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """A block without autocast on x's device: autocast switched off where it is on, and a no-op context
    where it is not (entering autocast's context costs several microseconds, a few % of a small call)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def at_least_float32(t: Tensor) -> Tensor:
    """t in fp32 if it is in a half-precision type (bf16, fp16); fp32 and fp64 stay as they are (without
    a call into torch: at small N every call's few microseconds count)."""
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.to(torch.promote_types(t.dtype, torch.float32))


# With autograd, split q/k/v products pay once the tokens outnumber the channels well: their backward
# assembles a (3C, C) weight gradient instead of a (B, N, 3C) activation gradient. Near B N = C the three
# smaller products only cost: a whole ViT-Ti training step at batch 1 (N = 197, C = 192) took 6% longer
# split than fused (and than timm's ViT) on the 2-core CPU; at B N = 4 C and above both took the same
# time (`lattn bench timm`, BENCHMARKS.md).
SPLIT_PROJECTION_TOKENS_PER_CHANNEL = 4


def fused_projection_pays(x: Tensor, weight: Tensor) -> bool:
    """Whether one product with a fused (q, k, v) weight beats separate products for tokens x (B, N, C):
    always without autograd (one larger matrix product, no extra memory); with autograd while B N is
    below SPLIT_PROJECTION_TOKENS_PER_CHANNEL x C (see there)."""
    tracked = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not tracked or x.shape[0] * x.shape[1] < SPLIT_PROJECTION_TOKENS_PER_CHANNEL * x.shape[-1]


class TokenMixer(nn.Module):
    """Base of every mechanism: validates inputs, then calls :meth:`mix`."""

    supports_rope = False
    supports_cross_attention = False
    needs_grid = False  # mixes along the H x W grid, so hw must be given
    fixed_grid = False  # built for one grid (grid_size); see resample_grid_weight for others

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(
        self,
        x: Tensor,
        hw: Grid | None = None,
        context: Tensor | None = None,
        context_hw: Grid | None = None,
    ) -> Tensor:
        name = type(self).__name__
        if hw is not None:
            hw = as_grid(hw)
        if context_hw is not None:
            context_hw = as_grid(context_hw)
        check_tokens(x, hw)
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name} was built for width {self.dim}; x has width {x.shape[-1]}")
        if hw is None and self.needs_grid:
            raise ValueError(f"{name} mixes tokens on a grid: pass hw=(H, W)")
        if context is not None:
            if not self.supports_cross_attention:
                raise ValueError(f"{name} does not support cross-attention (context=...)")
            check_tokens(context, context_hw, "context")
            if context.shape[0] != x.shape[0] or context.shape[-1] != x.shape[-1]:
                raise ValueError(
                    f"context {tuple(context.shape)} must match x {tuple(x.shape)} in batch and width"
                )
            if context_hw is None and self.needs_grid:
                raise ValueError(f"{name} needs the context's grid: pass context_hw=(H, W)")
        return self.mix(x, hw, context, context_hw)

    def mix(self, x: Tensor, hw: Grid | None, context: Tensor | None, context_hw: Grid | None) -> Tensor:
        raise NotImplementedError


class QKVAttention(TokenMixer):
    """Multi-head attention skeleton: q/k/v projections, optional RoPE, output projection.

    RoPE (``rope=True``) is 2D axial by default (``rope_form="2d"``, base 100); ``rope_form="1d"`` is the
    Hybrid Vision X-formers' 1D form over the token sequence (base 10,000); ``rope_base`` overrides the
    form's base. See :mod:`lattn_app.attention.rope` for which to use where.

    Subclasses implement :meth:`attend` on per-head tensors (B, heads, N, d). They declare only their own
    options and pass ``**common`` (the options below) on to this ``__init__``, the one place those are
    declared; :meth:`lattn_app.registry.Entry.accepts` follows them here. Parameter names (``qkv``,
    ``proj``) follow timm's ``Attention`` so a pretrained softmax ViT's weights load into any mechanism.

    Mechanisms whose normalisers are sums over all N tokens set ``compute_in_float32``: their
    :meth:`attend` then runs in fp32 with autocast off, so bf16/fp16 training accumulates the context
    and normalisers in fp32 and stays finite for large N.
    """

    # Each mechanism's class repeats the shape of these attributes and signature on purpose.
    # The skeleton rotates q and k (RoPE) and takes keys and values from a context (cross-attention) for
    # every subclass; a mechanism that cannot use either says so.
    supports_rope = True
    supports_cross_attention = True
    compute_in_float32 = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rope: bool = False,
        rope_base: float | None = None,
        rope_form: str = "2d",
    ) -> None:
        super().__init__(dim)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads; got num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rope and not self.supports_rope:
            raise ValueError(f"{type(self).__name__} does not support rotary position embedding (rope)")
        self.rope = build_rope(rope_form, self.head_dim, rope_base) if rope else None

    def split_heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q from x; k and v from context (cross-attention) or from x (self-attention).

        The fused qkv weight is split once into its q, k and v row blocks and applied as three products:
        the same result as one product split in three, but the backward pass then assembles the (3C, C)
        weight gradient instead of a (B, N, 3C) activation gradient (less memory in training, and
        faster; see BENCHMARKS.md). That pays off once there are several times more tokens than channels; for fewer
        tokens, and without autograd, one product of the fused weight, split into views, is cheaper.
        """
        if context is None and fused_projection_pays(x, self.qkv.weight):
            qkv = F.linear(x, self.qkv.weight, self.qkv.bias).unflatten(-1, (3, self.num_heads, self.head_dim))
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        source = x if context is None else context
        weights = self.qkv.weight.split(self.dim)
        biases = (None, None, None) if self.qkv.bias is None else self.qkv.bias.split(self.dim)
        q = F.linear(x, weights[0], biases[0])
        k = F.linear(source, weights[1], biases[1])
        v = F.linear(source, weights[2], biases[2])
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def mix(self, x: Tensor, hw: Grid | None, context: Tensor | None, context_hw: Grid | None) -> Tensor:
        q, k, v = self.project(x, context)
        kv_hw = hw if context is None else context_hw
        if self.rope is not None:
            q, k = self.rope(q, hw), self.rope(k, kv_hw)
        if self.compute_in_float32:
            with autocast_off(x):
                out = self.attend(at_least_float32(q), at_least_float32(k), at_least_float32(v), hw, kv_hw)
            if out.dtype != v.dtype:
                out = out.to(v.dtype)
        else:
            out = self.attend(q, k, v, hw, kv_hw)
        if context is None:
            local = self.local_term(v, hw)
            if local is not None:
                out = out + local
        out = out.transpose(1, 2).flatten(2)
        return self.proj_drop(self.proj(out))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        """Per-head attention: q (B, h, Nq, d), k and v (B, h, Nk, d) -> (B, h, Nq, d)."""
        raise NotImplementedError

    def local_term(self, v: Tensor, hw: Grid | None) -> Tensor | None:
        """Optional term added to the attention output in self-attention (e.g. Nystromformer's conv of v)."""
        return None

    def extra_repr(self) -> str:
        rope = "False" if self.rope is None else f"{self.rope.form!r}"
        return f"dim={self.dim}, num_heads={self.num_heads}, rope={rope}"


GRID_POLICIES = ("resample", "error")


def check_grid_policy(policy: str, mechanism: str) -> str:
    return check_choice(f"{mechanism}: on_other_grid", policy, GRID_POLICIES)


def resample_grid_weight(
    weight: Tensor, built_hw: Grid, hw: Grid, grid_dim: int, preserve_sum: bool, mechanism: str, policy: str
) -> Tensor:
    """Adapt a weight with one axis per grid token (length H*W at `grid_dim`) to another grid.

    Fixed-size mechanisms (linformer, mixer) learn one weight per token of the grid they were built
    for. On another grid the weight is bilinearly resampled as an image over (H, W); with
    `preserve_sum` it is also scaled by (H*W)/(H'*W') so that a weighted sum over all tokens keeps its
    magnitude. With ``policy="error"`` any other grid is refused with the supported size named.
    """
    # Under torch.export the resampling is traced for the built grid too (where bilinear resampling to the same
    # size reads every weight exactly), so that the exported model follows the grid of every input.
    if not (policy == "resample" and torch.compiler.is_exporting()) and tuple(hw) == tuple(built_hw):
        return weight
    if policy == "error":
        raise ValueError(
            f"{mechanism} was built for a {built_hw[0]}x{built_hw[1]} token grid and got "
            f"{hw[0]}x{hw[1]}; it supports only {built_hw[0]}x{built_hw[1]} "
            f"(set on_other_grid='resample' to resample its weights to other grids)"
        )
    moved = weight.movedim(grid_dim, -1)
    lead = moved.shape[:-1]
    image = moved.reshape(-1, 1, *built_hw).float()
    image = nn.functional.interpolate(image, size=tuple(hw), mode="bilinear", align_corners=False)
    if preserve_sum:
        image = image * (built_hw[0] * built_hw[1]) / (hw[0] * hw[1])
    return image.reshape(*lead, hw[0] * hw[1]).movedim(-1, grid_dim).to(weight.dtype)
