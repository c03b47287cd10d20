"""FNet Fourier token mixing (Lee-Thorp et al.; the X-formers paper's "FNet"). No parameters.

- ``mode="1d"`` (the paper): Re(FFT_seq(FFT_hidden(x))) over the whole token sequence, prefix tokens
  included.
- ``mode="2d"``: the natural form for images: Re(FFT over (H, W, hidden)) of the grid tokens. A prefix
  token receives the zero-frequency term of the sequence, Re(FFT_hidden(sum of all tokens)), which is
  exactly what the first token receives in the 1D form, so a class token still sees the whole image.

``fft_norm`` is passed to torch.fft ("backward", the paper's unscaled transform; or "ortho"). The
transform runs in fp32 under autocast (half-precision FFTs only exist for power-of-two sizes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import ATTENTIONS, check_choice
from .base import Grid, TokenMixer, at_least_float32, autocast_off, num_prefix

MODES = ("1d", "2d")
FFT_NORMS = ("backward", "ortho", "forward")


# From this many elements per sample (N x C) on, the half-spectrum path of real_part_of_fft2 is faster
# (measured on CPU: the full complex FFT over long sequences no longer fits in cache; below, the extra
# copies of the half-spectrum path cost more than they save).
REAL_INPUT_MIN_ELEMENTS = 2**20


def real_part_of_fft2(x: Tensor, norm: str) -> Tensor:
    """Re(FFT over (N, C)) of a real x (..., N, C) from half the spectrum, at half the FFT work.

    For real x, Y = FFT2(x) is conjugate-symmetric: Y[n, k] = conj(Y[-n mod N, C - k]), so
    Re Y[n, k] = Re Y[-n mod N, C - k]. Columns 0..C/2 come from an rFFT over channels followed by an FFT
    over the sequence; the others are those columns with both indices reflected.
    """
    channels = x.shape[-1]
    half = torch.fft.fft(torch.fft.rfft(x, dim=-1, norm=norm), dim=-2, norm=norm).real  # k = 0 .. C/2
    mirrored = half[..., 1:channels - channels // 2].flip(-1)  # k = C-1 .. C/2+1 read at C-k
    mirrored = torch.roll(mirrored.flip(-2), 1, dims=-2)  # row n reads row -n mod N
    return torch.cat([half, mirrored], dim=-1)


def real_part_of_fft(x: Tensor, dims: tuple[int, ...], norm: str) -> Tensor:
    """Re(FFT over `dims`) of a real x, by the fastest route for its size (no autograd of its own)."""
    # An exported graph keeps N symbolic, so it takes one route for every size (the full FFT's).
    if dims == (-2, -1) and not torch.compiler.is_exporting() and x.shape[-2] * x.shape[-1] >= REAL_INPUT_MIN_ELEMENTS:
        return real_part_of_fft2(x, norm)
    return torch.fft.fftn(x, dim=dims, norm=norm).real


class RealPartOfFFT(torch.autograd.Function):
    """Re(FFT over `dims`) of a real x, with the same transform as its backward pass.

    The map is its own adjoint: a multi-dimensional DFT is a product of symmetric DFT matrices K, and for
    real X and G, <G, Re(K X)> = Re <K^T G, X> = <Re(K G), X> (the same normalisation on both sides).
    So the gradient is Re(FFT(grad)): one real-to-real transform, where autograd would chain the complex
    FFTs' backward passes and hold full complex spectra (about 1.7x the memory).
    """

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...], norm: str) -> Tensor:
        ctx.dims, ctx.norm = dims, norm
        return real_part_of_fft(x, dims, norm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return RealPartOfFFT.apply(grad.contiguous(), ctx.dims, ctx.norm), None, None


@ATTENTIONS.register(
    "fnet",
    description="FNet: parameter-free Fourier mixing, 1D over the sequence or 2D over the grid",
    time="O(N C log(N C))",
    memory="O(N C)",
)
class FNetMixer(TokenMixer):
    """Real part of the Fourier transform over tokens and channels."""

    def __init__(self, dim: int, num_heads: int = 1, mode: str = "1d", fft_norm: str = "backward") -> None:
        super().__init__(dim)
        self.mode = check_choice("fnet: mode", mode, MODES)
        self.fft_norm = check_choice("fnet: fft_norm", fft_norm, FFT_NORMS)
        self.needs_grid = mode == "2d"

    def mix(self, x: Tensor, hw: Grid | None, context: Tensor | None, context_hw: Grid | None) -> Tensor:
        with autocast_off(x):
            out = self.fourier(at_least_float32(x), hw)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def fourier(self, x: Tensor, hw: Grid | None) -> Tensor:
        # Without a gradient to compute, the transform is called directly: a Function's apply costs
        # ~10 us, 4% of a call at N=196.
        transform = RealPartOfFFT.apply if torch.is_grad_enabled() and x.requires_grad else real_part_of_fft
        if self.mode == "1d":
            return transform(x, (-2, -1), self.fft_norm)
        assert hw is not None
        prefix = num_prefix(x.shape[1], hw)
        grid = x[:, prefix:].unflatten(1, hw)  # (B, H, W, C)
        mixed = transform(grid, (1, 2, 3), self.fft_norm).flatten(1, 2)
        if prefix == 0:
            return mixed
        # Zero frequency of the whole sequence, scaled like the "1d" transform's first row.
        dc_scale = {"backward": 1.0, "ortho": x.shape[1] ** -0.5, "forward": 1.0 / x.shape[1]}[self.fft_norm]
        dc = torch.fft.fft(x.sum(dim=1, keepdim=True) * dc_scale, dim=-1, norm=self.fft_norm).real
        return torch.cat([dc.expand(-1, prefix, -1), mixed], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode}, fft_norm={self.fft_norm}"
