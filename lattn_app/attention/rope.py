"""Rotary position embeddings (RoPE): 2D axial over an H x W grid (lattn's default) and 1D over the sequence.

- :class:`RotaryEmbedding2D` (``rope_form="2d"``, default base 100): the head dimension d is split in two
  halves, the first rotated by the token's row index, the second by its column index, each with the usual
  geometric ladder of d/4 frequencies. The dot product of a rotated query and key then depends on their
  offset (dy, dx) only, whatever the grid's width. Prefix tokens (class token and the like) carry no
  position and are left unrotated.
- :class:`RotaryEmbedding1D` (``rope_form="1d"``, default base 10,000): the form of the Hybrid Vision
  X-formers' released code (``Models/*RoPE.py`` in pranavphoenix/VisionXformer, after Su et al.): every
  token of the sequence, prefix tokens included, is rotated by its index in the sequence, channel pairs
  (2i, 2i+1) by the angle ``index * base^(-2i/d)``. With one class token in front it sits at index 0 (no
  rotation) and grid token (r, c) at 1 + r W + c, exactly as in the reference.

Where each is the better choice: 1D reproduces the paper's ViXRoPE models (the configs that claim their
recipe use it). 2D is lattn's default everywhere else: the flattened index makes the vertical neighbour
of a token W positions away, so a model trained at one width sees other offsets at another resolution
(fine-tuning at a new size, detection and stereo on variable sizes), and two views of different grids
(cross-attention) have no common 1D index; the axial form keeps (dy, dx) meaningful in all those cases.

Both rotate consecutive channel pairs (2i, 2i+1) as ``(x_2i cos a - x_2i+1 sin a, x_2i sin a + x_2i+1 cos a)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ROPE_FORMS = ("2d", "1d")
DEFAULT_BASE = {"2d": 100.0, "1d": 10_000.0}


def rotate_pairs(t: Tensor, angles: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (2i, 2i+1) of t (..., n, d) by angles (n, d/2)."""
    cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
    pairs = t.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class RotaryEmbedding2D(nn.Module):
    """Axial 2D rotary embedding; ``rope(t, hw)`` rotates the last H*W tokens of t (B, heads, N, d)."""

    form = "2d"

    def __init__(self, head_dim: int, base: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(
                f"2D rotary embedding needs a head size divisible by 4 (two axes x cos/sin pairs); "
                f"got head size {head_dim}"
            )
        self.head_dim = head_dim
        self.base = base
        quarter = head_dim // 4
        inv_freq = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def angles(self, hw: tuple[int, int], device: torch.device) -> Tensor:
        """Rotation angles (H*W, d/2): row angles for the first d/4 pairs, column angles for the rest."""
        height, width = hw
        rows = torch.arange(height, device=device, dtype=torch.float32)
        cols = torch.arange(width, device=device, dtype=torch.float32)
        inv_freq = self.inv_freq.to(device)
        row_angles = torch.outer(rows, inv_freq)[:, None, :].expand(height, width, -1)
        col_angles = torch.outer(cols, inv_freq)[None, :, :].expand(height, width, -1)
        return torch.cat([row_angles, col_angles], dim=-1).reshape(height * width, -1)

    def forward(self, t: Tensor, hw: tuple[int, int] | None) -> Tensor:
        if hw is None:
            raise ValueError("2D rotary position embedding needs the token grid: pass hw (and context_hw)")
        num_spatial = hw[0] * hw[1]
        prefix, spatial = t[..., : t.shape[-2] - num_spatial, :], t[..., -num_spatial:, :]
        return torch.cat([prefix, rotate_pairs(spatial, self.angles(hw, t.device))], dim=-2)


class RotaryEmbedding1D(nn.Module):
    """1D rotary embedding over the sequence; ``rope(t, hw)`` rotates every token of t (B, heads, N, d)
    by its index 0 .. N-1 (``hw`` is accepted for the common interface and not used)."""

    form = "1d"

    def __init__(self, head_dim: int, base: float = 10_000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"1D rotary embedding needs an even head size (cos/sin pairs); got {head_dim}")
        self.head_dim = head_dim
        self.base = base

    def angles(self, num_tokens: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rotation angles (N, d/2): token index times each frequency, in float64 for float64 tensors
        (exact comparisons) and float32 otherwise."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=dtype) / self.head_dim
        positions = torch.arange(num_tokens, device=device, dtype=dtype)
        return torch.outer(positions, self.base**-exponents)

    def forward(self, t: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return rotate_pairs(t, self.angles(t.shape[-2], t.device, dtype))


def build_rope(form: str, head_dim: int, base: float | None) -> nn.Module:
    """The rotary embedding of `form` ("2d" or "1d") with `base` (None: that form's default)."""
    if form not in ROPE_FORMS:
        raise ValueError(f"rope_form must be one of {ROPE_FORMS}; got {form!r}")
    base = DEFAULT_BASE[form] if base is None else float(base)
    return (RotaryEmbedding2D if form == "2d" else RotaryEmbedding1D)(head_dim, base=base)
