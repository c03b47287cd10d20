"""The reference formulations: each method computed the way its public reference code computes it.

`lattn bench attention` measures lattn's mechanisms side by side with these (rows named
``reference:<mechanism>``), at the same width, heads and options, to check that lattn is at least as fast
and no hungrier for memory. Where the public code is a package on the package registry, the row is that
package's layer itself (the ``bench`` extra installs them): timm's ``Attention`` for softmax,
performer-pytorch, linformer and nystrom-attention; without the package the row is left out. The others
have no package (the authors' repositories are not installable): their code path is re-implemented here,
minimally and as described in docs/methods.md: the same layout, the same order of operations, the same
loops and the same intermediate tensors as the reference, without its training-only features.

Each reference module takes its input in its own layout: :meth:`prepare` turns tokens (B, N, C) on an
(H, W) grid into the arguments of its ``forward`` (outside the timed region).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


Grid = tuple[int, int]


class ReferenceModule(nn.Module):
    """A reference formulation; ``module(*module.prepare(x, hw))`` computes it on tokens x."""

    def prepare(self, x: Tensor, hw: Grid) -> tuple[Tensor, ...]:
        return (x,)


class TimmSoftmaxAttention(ReferenceModule):
    """timm's ``Attention`` (fused SDPA, or the explicit N x N map with ``fused=False``)."""

    def __init__(self, dim: int, num_heads: int, hw: Grid, fused: bool = True) -> None:
        super().__init__()
        from timm.layers import Attention

        self.attention = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.attention.fused_attn = fused

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x)


class ReferenceEfficientAttention(ReferenceModule):
    """Efficient Attention as the authors' module computes it (docs/methods.md#efficient).

    Channels-first maps (B, C, H, W); 1x1 convolutions for keys, queries and values; a Python loop over
    heads, each taking a channel slice, softmax over positions for keys and over channels for queries,
    context = keys values^T, output = context^T queries; the heads concatenated, reprojected by a 1x1
    convolution and added to the input.
    """

    def __init__(self, dim: int, num_heads: int, hw: Grid) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.keys = nn.Conv2d(dim, dim, 1)
        self.queries = nn.Conv2d(dim, dim, 1)
        self.values = nn.Conv2d(dim, dim, 1)
        self.reprojection = nn.Conv2d(dim, dim, 1)

    def prepare(self, x: Tensor, hw: Grid) -> tuple[Tensor, ...]:
        return (x.transpose(1, 2).unflatten(2, hw).contiguous(),)

    def forward(self, maps: Tensor) -> Tensor:
        batch, channels, height, width = maps.shape
        keys = self.keys(maps).reshape(batch, channels, height * width)
        queries = self.queries(maps).reshape(batch, channels, height * width)
        values = self.values(maps).reshape(batch, channels, height * width)
        head_channels = channels // self.num_heads
        heads = []
        for head in range(self.num_heads):
            part = slice(head * head_channels, (head + 1) * head_channels)
            key = keys[:, part].softmax(dim=2)  # over positions
            query = queries[:, part].softmax(dim=1)  # over channels
            context = key @ values[:, part].transpose(1, 2)  # (B, d_k, d_v)
            heads.append((context.transpose(1, 2) @ query).reshape(batch, head_channels, height, width))
        return self.reprojection(torch.cat(heads, dim=1)) + maps


class PackageLayer(ReferenceModule):
    """A public package's own attention layer, used as is: ``layer(x)`` on tokens (B, N, C)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def performer_package(dim: int, num_heads: int, hw: Grid) -> PackageLayer:
    """performer-pytorch's ``SelfAttention`` (FAVOR+, d log d features: lattn's default), with q, k, v biases."""
    from performer_pytorch import SelfAttention

    return PackageLayer(SelfAttention(dim, heads=num_heads, dim_head=dim // num_heads, qkv_bias=True))


def linformer_package(dim: int, num_heads: int, hw: Grid, k: int = 64) -> PackageLayer:
    """linformer's ``LinformerSelfAttention`` over the grid's N tokens, k = 64 (lattn's default)."""
    from linformer import LinformerSelfAttention

    return PackageLayer(LinformerSelfAttention(dim, hw[0] * hw[1], k=k, heads=num_heads, dim_head=dim // num_heads))


def nystrom_package(dim: int, num_heads: int, hw: Grid) -> PackageLayer:
    """nystrom-attention's ``NystromAttention`` with lattn's defaults: 64 landmarks, 6 iterations, a 33 x 1 conv."""
    from nystrom_attention import NystromAttention

    return PackageLayer(NystromAttention(dim, dim_head=dim // num_heads, heads=num_heads, num_landmarks=64,
                                         pinv_iterations=6, residual=True, residual_conv_kernel=33))


class ReferenceCouplingAttention(ReferenceModule):
    """Coupling attention computed literally as docs/methods.md#coupling states it: per head, q and k
    reshaped to rows (H x W*d) and to columns (W x H*d); A = softmax(Q_r K_r^T s), B = softmax(Q_c K_c^T s)
    by matrix products; Y_j = A V_j B^T for every channel j as batched matrix products over (d, H, W)."""

    def __init__(self, dim: int, num_heads: int, hw: Grid) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hw = hw
        self.scale = (dim // num_heads) ** -0.25
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        height, width = self.hw
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height, width, 3, self.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)  # (B, h, H, W, d)
        rows_q, rows_k = q.flatten(-2), k.flatten(-2)  # H x (W d)
        cols_q, cols_k = q.transpose(2, 3).flatten(-2), k.transpose(2, 3).flatten(-2)  # W x (H d)
        row_map = (rows_q @ rows_k.transpose(-1, -2) * self.scale).softmax(dim=-1)  # (B, h, H, H)
        col_map = (cols_q @ cols_k.transpose(-1, -2) * self.scale).softmax(dim=-1)  # (B, h, W, W)
        channels = v.permute(0, 1, 4, 2, 3)  # (B, h, d, H, W): one H x W matrix V_j per channel
        out = row_map.unsqueeze(2) @ channels @ col_map.unsqueeze(2).transpose(-1, -2)
        out = out.permute(0, 3, 4, 1, 2).reshape(batch, tokens, -1)
        return self.proj(out)


class ReferenceCareAttention(ReferenceModule):
    """CARE's linear attention as its reference block computes it (docs/methods.md#care): one linear
    layer for q and k, v the input itself, phi = ELU + 1, kv with both factors scaled by N^-1/2,
    z = 1 / (phi(q) . mean phi(k) + 1e-6), no output projection."""

    def __init__(self, dim: int, num_heads: int, hw: Grid) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, channels = x.shape
        q, k = self.qk(x).reshape(batch, tokens, 2, channels).permute(2, 0, 1, 3)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        q, k, v = (t.reshape(batch, tokens, self.num_heads, -1).transpose(1, 2) for t in (q, k, x))
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (k.transpose(-2, -1) * tokens**-0.5) @ (v * tokens**-0.5)
        out = q @ kv * z
        return out.transpose(1, 2).reshape(batch, tokens, channels)


class ReferenceFNet(ReferenceModule):
    """FNet's Fourier block: an FFT over the hidden dimension, then one over the sequence; real part."""

    def __init__(self, dim: int, num_heads: int, hw: Grid) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real


class ReferenceMixerTokenMixing(ReferenceModule):
    """MLP-Mixer's token-mixing MLP as lucidrains' mlp-mixer builds it: 1x1 Conv1d layers that treat the
    N tokens as channels (N -> hidden -> N), GELU between them."""

    def __init__(self, dim: int, num_heads: int, hw: Grid, hidden_dim: int = 256) -> None:
        super().__init__()
        tokens = hw[0] * hw[1]
        self.mlp = nn.Sequential(nn.Conv1d(tokens, hidden_dim, 1), nn.GELU(), nn.Conv1d(hidden_dim, tokens, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


@dataclass(frozen=True)
class Reference:
    """A reference formulation and the lattn case it is compared with (same width, heads, options)."""

    build: Callable[..., ReferenceModule]
    ours: str  # the label of lattn's case in the attention benchmark
    source: str  # what it is: the package's layer, or what it re-implements
    options: dict[str, Any] = field(default_factory=dict)
    package: str | None = None  # the module to import (the `bench` extra installs it); None: a rewrite

    @property
    def available(self) -> bool:
        """False when its package is not installed (`pip install "lattn[bench]"`): the row is left out."""
        return self.package is None or importlib.util.find_spec(self.package) is not None


REFERENCES: dict[str, Reference] = {
    "softmax": Reference(TimmSoftmaxAttention, "softmax", "timm.layers.Attention (fused SDPA), used as is"),
    "softmax-materialised": Reference(
        TimmSoftmaxAttention, "softmax-materialised", "timm.layers.Attention with fused_attn=False, used as is",
        {"fused": False},
    ),
    "efficient": Reference(ReferenceEfficientAttention, "efficient",
                           "the authors' EfficientAttention module (per-head loop, channels-first)"),
    "performer": Reference(performer_package, "performer", "performer-pytorch 1.1.4's SelfAttention, used as is",
                           package="performer_pytorch"),
    "linformer": Reference(linformer_package, "linformer", "linformer 0.2.3's LinformerSelfAttention, used as is",
                           package="linformer"),
    "nystrom": Reference(nystrom_package, "nystrom", "nystrom-attention 0.0.14's NystromAttention, used as is",
                         package="nystrom_attention"),
    "coupling": Reference(ReferenceCouplingAttention, "coupling", "docs/methods.md's coupling formulas as stated"),
    "care": Reference(ReferenceCareAttention, "care-block", "the CARE block's linear attention"),
    "fnet": Reference(ReferenceFNet, "fnet", "FNet's Fourier block (two 1D FFTs)"),
    "mixer": Reference(ReferenceMixerTokenMixing, "mixer", "lucidrains' mlp-mixer token-mixing layers"),
}
