"""Performer attention, FAVOR+ (Choromanski et al.; the X-formers paper's "Performer").

Positive orthogonal random features approximate the softmax kernel exp(q.k / sqrt(d)):
    phi(x) = m^-1/2 (exp(W x^ - |x^|^2 / 2 - stabiliser) + kernel_epsilon),  x^ = x d^-1/4,
with W (m x d) made of blocks of orthogonal rows scaled to Gaussian norms. Then
    out = D^-1 phi(q) (phi(k)^T v),  D = diag(phi(q) sum_j phi(k_j)),
in O(N m d) time and without any N x N map.

Two forms of the feature map:
- ``kernel_epsilon=0`` (default): the paper's formula. The stabiliser is the maximum of the exponent
  (W x^ - |x^|^2 / 2), per query for queries and over all keys of one sample and head for keys: both
  cancel exactly in D^-1, so the features are the paper's positive random features, no exponent exceeds
  0 and the output does not depend on how they were stabilised.
- ``kernel_epsilon > 0``: the released code's form (performer-pytorch's ``softmax_kernel``, which the
  X-formers' ViP uses with 1e-4). The stabiliser is then the maximum of the projections W x^ alone (per
  query; per sample and head for keys), and the epsilon is added after stabilising, so it is relative to
  the largest feature and the result depends on the stabiliser: lattn follows the reference exactly.
  It keeps every feature >= epsilon (no all-zero normaliser) but biases the estimate: the output differs
  from the paper's form by ~1e-5 at initialisation-sized logits and by more than 100% once the spread of
  the logits reaches ~0.8, which is why it is not the default. ``stabiliser="batch"`` takes the keys'
  maximum over the whole batch instead, as the X-formers' vendored copy of the kernel does; that couples
  the samples of a batch (an output depends on its batch mates whenever kernel_epsilon > 0), so it exists
  only to reproduce that code, and the configs keep the per-sample maximum of performer-pytorch 1.1.4.

Random features are drawn per layer: the draw is seeded by ``feature_seed``, the layer's ``layer_index``
(the backbones pass each block's index) and the redraw count, so different layers have independent
features (as in the reference, whose every layer draws its own matrix) while every DDP rank and every
resumed run sees the same ones. ``layer_index=None`` is the seeding of earlier lattn versions (every
layer the same draw). Features are redrawn every ``redraw_interval`` training forward passes (never in
eval mode); ``redraw_interval=None`` freezes them, as the X-formers' released ViP scripts do (they never
call performer-pytorch's redraw). Under ``torch.compile`` a lattn task counts the passes before each
training step (:meth:`PerformerAttention.count_training_pass`), outside the compiled graph.
"""

from __future__ import annotations

from typing import Any

import hashlib
import math

import torch
from torch import Tensor

from ..registry import ATTENTIONS, check_choice
from .base import Grid, QKVAttention


def orthogonal_random_features(num_features: int, dim: int, generator: torch.Generator) -> Tensor:
    """(num_features, dim) matrix: stacked blocks of orthonormal rows, each row scaled to a chi(dim) norm."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        orthonormal, _ = torch.linalg.qr(gaussian)
        blocks.append(orthonormal.T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (norms[:, None] * rows).float()


# Registered like every mechanism (decorator, class, its own options): that shared shape is on purpose.
@ATTENTIONS.register(
    "performer",
    description="Performer FAVOR+: positive orthogonal random features approximating softmax",
    time="O(N m d)",
    memory="O(m d)",
)
class PerformerAttention(QKVAttention):
    """FAVOR+ attention with orthogonal random features and periodic redraw."""

    compute_in_float32 = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_features: int | None = None,
        redraw_interval: int | None = 1000,
        feature_seed: int = 0,
        layer_index: int | None = None,
        kernel_epsilon: float = 0.0,
        stabiliser: str = "sample",
        **common: Any,
    ) -> None:
        super().__init__(dim, num_heads, **common)
        if kernel_epsilon < 0:
            raise ValueError(f"performer: kernel_epsilon must be >= 0; got {kernel_epsilon}")
        self.kernel_epsilon = float(kernel_epsilon)
        self.stabiliser = check_choice("performer: stabiliser", stabiliser, ("sample", "batch"))
        self.layer_index = layer_index
        d = self.head_dim
        self.num_features = num_features or max(1, int(d * math.log(d)))  # m = d ln d by default
        if redraw_interval is not None and redraw_interval < 0:
            raise ValueError(f"performer: redraw_interval must be >= 1 or None; got {redraw_interval}")
        self.redraw_interval = redraw_interval or None
        self.feature_seed = feature_seed
        self.register_buffer("redraws", torch.zeros((), dtype=torch.long))
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long))
        self.register_buffer("projection", self._draw(0))

    def draw_seed(self, redraw_index: int) -> int:
        """The generator seed of draw `redraw_index`: a function of feature_seed, layer_index and the redraw
        count only (no process state), so that every rank and every resumed run draws the same features."""
        if self.layer_index is None:  # the seeding of earlier versions: one draw shared by all layers
            return self.feature_seed * 1_000_003 + redraw_index
        key = f"performer/{self.feature_seed}/{self.layer_index}/{redraw_index}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    def _draw(self, redraw_index: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.draw_seed(redraw_index))
        return orthogonal_random_features(self.num_features, self.head_dim, generator)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a new random projection (called automatically while training)."""
        self.redraws += 1
        self.projection.copy_(self._draw(int(self.redraws)))
        self.calls_since_redraw.zero_()

    def feature_map(self, x: Tensor, is_query: bool) -> Tensor:
        x = x * self.head_dim**-0.25
        half_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)
        projections = x @ self.projection.to(x.dtype).T
        if self.kernel_epsilon:
            return self.reference_feature_map(projections, half_norm, is_query)
        # One (B, h, N, m) buffer, updated in place (the product's backward needs x, not its output):
        # exp(W x - |x|^2/2 - stabiliser) m^-1/2 = exp(W x - |x|^2/2 - (stabiliser + ln(m)/2)).
        logits = projections.sub_(half_norm)
        with torch.no_grad():
            if is_query:  # per query: cancels in that query's own normaliser
                stabiliser = logits.amax(dim=-1, keepdim=True)
            else:  # one value per sample and head: cancels in every normaliser of that sample
                stabiliser = logits.amax(dim=(-2, -1), keepdim=True)
            stabiliser += 0.5 * math.log(self.num_features)
        return logits.sub_(stabiliser).exp_()

    def reference_feature_map(self, projections: Tensor, half_norm: Tensor, is_query: bool) -> Tensor:
        """performer-pytorch's form: m^-1/2 (exp(W x - |x|^2/2 - max W x) + epsilon), max not differentiated."""
        with torch.no_grad():
            if is_query:
                stabiliser = projections.amax(dim=-1, keepdim=True)
            elif self.stabiliser == "sample":
                stabiliser = projections.amax(dim=(-2, -1), keepdim=True)
            else:  # the X-formers' vendored kernel: one maximum over the whole batch
                stabiliser = projections.amax()
        # m^-1/2 (exp(z) + eps) = exp(z - ln(m)/2) + eps m^-1/2; not in place after exp, whose backward needs it.
        exponent = projections.sub_(half_norm).sub_(stabiliser + 0.5 * math.log(self.num_features))
        return exponent.exp() + self.kernel_epsilon * self.num_features**-0.5

    @torch.no_grad()
    def count_training_pass(self) -> None:
        """Count one training forward pass, first redrawing the features if `redraw_interval` passes used them.

        Eager: :meth:`attend` calls it. Compiled, the count cannot be in the graph (a branch on a buffer's
        value): :class:`~lattn_app.tasks.base.LattnTask` calls it before each training step instead.
        """
        if self.redraw_interval is None:
            return
        if int(self.calls_since_redraw) >= self.redraw_interval:
            self.redraw_features()
        self.calls_since_redraw += 1

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_hw: Grid | None, kv_hw: Grid | None) -> Tensor:
        if self.training and not torch.compiler.is_compiling():
            self.count_training_pass()
        phi_q, phi_k = self.feature_map(q, is_query=True), self.feature_map(k, is_query=False)
        context = phi_k.transpose(-2, -1) @ v  # (B, h, m, d)
        normaliser = phi_q @ phi_k.sum(dim=-2).unsqueeze(-1)  # (B, h, N, 1)
        return (phi_q @ context) / normaliser.clamp_min(torch.finfo(normaliser.dtype).tiny)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_features={self.num_features}, redraw_interval={self.redraw_interval}, "
                f"layer_index={self.layer_index}, kernel_epsilon={self.kernel_epsilon}")
