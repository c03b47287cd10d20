"""The reference formulations: each method computed the way its public reference code computes it.

`lattn bench attention` measures lattn's mechanisms side by side with these (rows named
``reference:<mechanism>``), at the same width, heads and options, to check that lattn is at least as fast
and no hungrier for memory. Nothing can be downloaded on a benchmark machine, so each method's reference
code path is re-implemented here, minimally and as described in docs/methods.md: the same layout, the same
order of operations, the same loops and the same intermediate tensors as the reference, without its
training-only features. Softmax attention is measured against timm's ``Attention`` itself.

Each reference module takes its input in its own layout: :meth:`prepare` turns tokens (B, N, C) on an
(H, W) grid into the arguments of its ``forward`` (outside the timed region).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..attention.performer import orthogonal_random_features

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


class ReferencePerformerAttention(ReferenceModule):
    """FAVOR+ as performer-pytorch computes it (the X-formers' Performer; docs/methods.md#performer).

    Separate q, k, v linear layers; features by einsum with the projection; the key stabiliser is the
    maximum over the whole key tensor (all samples); 1e-4 added to every feature; the normaliser D^-1
    and the output by einsum.
    """

    def __init__(self, dim: int, num_heads: int, hw: Grid, num_features: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.num_features = num_features or max(1, int(head_dim * math.log(head_dim)))
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", orthogonal_random_features(self.num_features, head_dim, generator))

    def features(self, data: Tensor, is_query: bool, eps: float = 1e-4) -> Tensor:
        normalizer = data.shape[-1] ** -0.25
        ratio = self.projection.shape[0] ** -0.5
        data_dash = torch.einsum("...id,jd->...ij", normalizer * data, self.projection)
        diag_data = (data**2).sum(dim=-1, keepdim=True) / 2.0 * normalizer**2
        if is_query:
            stabiliser = data_dash.amax(dim=-1, keepdim=True).detach()
        else:
            stabiliser = data_dash.amax().detach()
        return ratio * (torch.exp(data_dash - diag_data - stabiliser) + eps)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (layer(x).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)
                   for layer in (self.to_q, self.to_k, self.to_v))
        q, k = self.features(q, is_query=True), self.features(k, is_query=False)
        k_sum = k.sum(dim=-2)
        d_inv = 1.0 / torch.einsum("...nd,...d->...n", q, k_sum.type_as(q))
        context = torch.einsum("...nd,...ne->...de", k, v)
        out = torch.einsum("...de,...nd,...n->...ne", context, q, d_inv)
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class ReferenceLinformerAttention(ReferenceModule):
    """Linformer as lucidrains' linformer computes it: q, k, v linear layers; keys and values of full
    width projected along the sequence by E, F (N x k) before the heads are split; explicit N x k map."""

    def __init__(self, dim: int, num_heads: int, hw: Grid, k: int = 64) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        tokens = hw[0] * hw[1]
        self.proj_k = nn.Parameter(torch.randn(tokens, k) * k**-0.5)
        self.proj_v = nn.Parameter(torch.randn(tokens, k) * k**-0.5)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        queries, keys, values = self.to_q(x), self.to_k(x), self.to_v(x)
        keys = torch.einsum("bnd,nk->bkd", keys, self.proj_k)
        values = torch.einsum("bnd,nk->bkd", values, self.proj_v)
        queries, keys, values = (t.reshape(batch, t.shape[1], self.num_heads, -1).transpose(1, 2)
                                 for t in (queries, keys, values))
        dots = torch.einsum("bhnd,bhkd->bhnk", queries, keys) * self.scale
        out = torch.einsum("bhnk,bhkd->bhnd", dots.softmax(dim=-1), values)
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class ReferenceNystromAttention(ReferenceModule):
    """Nystromformer as its reference code computes it (docs/methods.md#nystrom): fused qkv layer;
    zero padding at the front up to a multiple of the landmarks, counted in the landmark means; q and k
    scaled by d^-1/4; three softmax kernels; Newton pseudo-inverse initialised with norms over the whole
    batch; depthwise (33 x 1) convolution of v added."""

    def __init__(self, dim: int, num_heads: int, hw: Grid, num_landmarks: int = 64,
                 pinv_iterations: int = 6, conv_kernel: int = 33) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.res_conv = nn.Conv2d(num_heads, num_heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0),
                                  groups=num_heads, bias=False)

    @staticmethod
    def pinv(x: Tensor, iterations: int) -> Tensor:
        abs_x = x.abs()
        column, row = abs_x.sum(dim=-1), abs_x.sum(dim=-2)
        z = x.transpose(-1, -2) / (column.max() * row.max())  # norms over the whole batch
        identity = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
        for _ in range(iterations):
            xz = x @ z
            z = 0.25 * z @ (13 * identity - (xz @ (15 * identity - (xz @ (7 * identity - xz)))))
        return z

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        m = self.num_landmarks
        padding = -tokens % m
        if padding:
            x = F.pad(x, (0, 0, padding, 0))
        q, k, v = self.to_qkv(x).reshape(batch, x.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        scale = q.shape[-1] ** -0.25
        q, k = q * scale, k * scale
        segment = x.shape[1] // m
        q_landmarks = q.reshape(batch, self.num_heads, m, segment, -1).sum(dim=-2) / segment
        k_landmarks = k.reshape(batch, self.num_heads, m, segment, -1).sum(dim=-2) / segment
        kernel_1 = (q @ k_landmarks.transpose(-1, -2)).softmax(dim=-1)
        kernel_2 = (q_landmarks @ k_landmarks.transpose(-1, -2)).softmax(dim=-1)
        kernel_3 = (q_landmarks @ k.transpose(-1, -2)).softmax(dim=-1)
        out = (kernel_1 @ self.pinv(kernel_2, self.pinv_iterations)) @ (kernel_3 @ v)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(batch, x.shape[1], -1)[:, padding:]
        return self.to_out(out)


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
    source: str  # what it re-implements
    options: dict[str, Any] = field(default_factory=dict)


REFERENCES: dict[str, Reference] = {
    "softmax": Reference(TimmSoftmaxAttention, "softmax", "timm.layers.Attention (fused SDPA), used as is"),
    "softmax-materialised": Reference(
        TimmSoftmaxAttention, "softmax-materialised", "timm.layers.Attention with fused_attn=False, used as is",
        {"fused": False},
    ),
    "efficient": Reference(ReferenceEfficientAttention, "efficient",
                           "the authors' EfficientAttention module (per-head loop, channels-first)"),
    "performer": Reference(ReferencePerformerAttention, "performer", "performer-pytorch's FAVOR+ path"),
    "linformer": Reference(ReferenceLinformerAttention, "linformer", "lucidrains' linformer attention"),
    "nystrom": Reference(ReferenceNystromAttention, "nystrom", "the Nystromformer reference attention"),
    "coupling": Reference(ReferenceCouplingAttention, "coupling", "docs/methods.md's coupling formulas as stated"),
    "care": Reference(ReferenceCareAttention, "care-block", "the CARE block's linear attention"),
    "fnet": Reference(ReferenceFNet, "fnet", "FNet's Fourier block (two 1D FFTs)"),
    "mixer": Reference(ReferenceMixerTokenMixing, "mixer", "lucidrains' mlp-mixer token-mixing layers"),
}
