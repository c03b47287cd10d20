"""The Efficient Attention paper's attention module on feature maps, around any registered mechanism.

Shared by the networks that insert it into a CNN: the ResNets of :mod:`lattn_app.backbones.resnet_attention`
(ImageNet, Mask R-CNN) and EA-PSMNet (:mod:`lattn_app.models.psmnet`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..attention import attention_info, create_attention
from ..attention.base import QKVAttention, at_least_float32, autocast_off
from .base import maps_to_tokens, tokens_to_maps
from .blocks import mixer_options, per_layer_options


def uses_own_projections(attention: str) -> bool:
    """Whether `attention` runs inside the module's own query/key/value convolutions: a q/k/v mechanism
    whose projections are the shared ones of QKVAttention (efficient, softmax, performer, nystrom,
    coupling). The others (their own projections or no q/k/v at all) run as whole token mixers."""
    builder = attention_info(attention).builder
    return (isinstance(builder, type) and issubclass(builder, QKVAttention)
            and builder.project is QKVAttention.project and builder.mix is QKVAttention.mix)


class AttentionModule2d(nn.Module):
    """The Efficient Attention paper's residual attention module on maps (B, C, H, W), any mechanism.

    Mechanisms with the shared q/k/v projections (``efficient``, ``softmax``, ``performer``, ``nystrom``,
    ``coupling``) run between the module's own 1x1 convolutions ``queries``, ``keys`` (C -> key_channels),
    ``values`` (C -> value_channels) and ``reprojection`` (value_channels -> C), the parameter names and
    shapes of the released module; the mechanism contributes only its attention (its ``attend``), so its
    own projection layers are not built. With ``efficient``, ``num_heads=1`` and the defaults
    (key_channels C/2, value_channels C) this is the paper's module exactly. Every other mechanism
    (``care``, ``linformer``, ``fnet``, ``mixer``: their own projections or none) runs as a whole token
    mixer of width C on the H*W tokens, inside the same residual: ``x + mixer(x)``.

    Args:
        channels: C, the channels of the maps.
        attention: registered mechanism (``lattn list attention``).
        key_channels: width of queries and keys (default C / 2, the paper's and the non-local block's).
        value_channels: width of the values (default C).
        num_heads: heads (the paper: 1; the release adds more as an option).
        attention_options: the mechanism's own options.
        grid: token grid the module is built for; used by fixed-grid mechanisms (linformer, mixer) only.
        zero_init_reprojection: the reprojection (or the mixer's output projection) starts at zero, so the
            module starts as the identity: inserted into a pretrained network it changes nothing at first,
            as the non-local block's zero-initialised BatchNorm. The paper states no initialisation; this
            is lattn's choice.
        layer_index: the module's index in its network, for mechanisms that draw per layer (performer's
            random features: independent draws, the same on every rank and resume).
    """

    def __init__(
        self,
        channels: int,
        attention: str = "efficient",
        key_channels: int | None = None,
        value_channels: int | None = None,
        num_heads: int = 1,
        attention_options: dict[str, Any] | None = None,
        grid: tuple[int, int] = (14, 14),
        zero_init_reprojection: bool = True,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        key_channels = key_channels or channels // 2
        value_channels = value_channels or channels
        for name, width in (("key_channels", key_channels), ("value_channels", value_channels)):
            if width % num_heads:
                raise ValueError(f"attention module: {name}={width} is not divisible by num_heads={num_heads}")
        self.channels, self.key_channels, self.value_channels = channels, key_channels, value_channels
        self.num_heads = num_heads
        self.attention_name = attention
        options = per_layer_options(attention, mixer_options(attention, attention_options, tuple(grid)), layer_index)
        self.own_projections = uses_own_projections(attention)
        if self.own_projections:
            self.queries = nn.Conv2d(channels, key_channels, 1)
            self.keys = nn.Conv2d(channels, key_channels, 1)
            self.values = nn.Conv2d(channels, value_channels, 1)
            self.kernel = create_attention(attention, key_channels, num_heads=num_heads, **options)
            # The convolutions above are the projections: the mechanism's own are not used, so not kept.
            self.kernel.qkv = None
            self.kernel.proj = None
            self.reprojection = nn.Conv2d(value_channels, channels, 1)
            last = self.reprojection
        else:
            self.mixer = create_attention(attention, channels, num_heads=num_heads, **options)
            last = getattr(self.mixer, "proj", None)
        if zero_init_reprojection and isinstance(last, (nn.Conv2d, nn.Linear)):
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def _heads(self, maps: Tensor) -> Tensor:
        """(B, heads * d, H, W) -> (B, heads, H*W, d)."""
        return maps_to_tokens(maps).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        hw = (x.shape[-2], x.shape[-1])
        if not self.own_projections:
            return x + tokens_to_maps(self.mixer(maps_to_tokens(x), hw), hw)
        q, k, v = self._heads(self.queries(x)), self._heads(self.keys(x)), self._heads(self.values(x))
        if self.kernel.compute_in_float32:  # the mechanism's fp32 island, as in QKVAttention.mix
            with autocast_off(x):
                out = self.kernel.attend(at_least_float32(q), at_least_float32(k), at_least_float32(v), hw, hw)
            out = out.to(v.dtype)
        else:
            out = self.kernel.attend(q, k, v, hw, hw)
        local = self.kernel.local_term(v, hw)
        if local is not None:
            out = out + local
        attended = tokens_to_maps(out.transpose(1, 2).flatten(2), hw)
        return x + self.reprojection(attended)

    def extra_repr(self) -> str:
        widths = (f", key_channels={self.key_channels}, value_channels={self.value_channels}"
                  if self.own_projections else " (whole token mixer)")
        return f"channels={self.channels}, attention={self.attention_name!r}, num_heads={self.num_heads}{widths}"
