"""Helpers shared by the attention tests."""

from __future__ import annotations

import torch

from lattn_app.attention import attention_info, create_attention

ALL_MECHANISMS = ["softmax", "efficient", "performer", "linformer", "nystrom", "fnet", "mixer", "coupling", "care"]
# float64 comparisons against the authors' code (weights copied across): agreement to round-off.
TIGHT = dict(rtol=1e-10, atol=1e-12)
LINEAR_MECHANISMS = ["efficient", "performer", "nystrom", "care", "coupling", "fnet"]


def build(name: str, dim: int = 64, num_heads: int = 4, hw=(12, 20), prefix: int = 1, **options):
    """A mechanism in eval mode; fixed-grid mechanisms are built for `hw` with `prefix` prefix tokens."""
    if attention_info(name).fixed_grid:
        options.setdefault("grid_size", hw)
    if name == "mixer":
        options.setdefault("num_prefix_tokens", prefix)
    return create_attention(name, dim=dim, num_heads=num_heads, **options).eval()


def heads(module, x: torch.Tensor):
    """q, k, v per head (B, h, N, d) computed directly from a module's fused qkv weights."""
    b, n, c = x.shape
    qkv = x @ module.qkv.weight.T + module.qkv.bias
    q, k, v = qkv.view(b, n, 3, module.num_heads, c // module.num_heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def merge(module, out: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) per-head outputs -> the module's output projection of (B, N, C)."""
    return module.proj(out.transpose(1, 2).flatten(2))


