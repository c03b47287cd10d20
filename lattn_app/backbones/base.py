"""What every backbone shares: the interface the tasks rely on, and one complexity counter.

A backbone turns images (B, 3, H, W) into
- ``forward_features(images)``: unpooled features (tokens (B, N, C) or maps (B, C, h, w));
- ``forward_head(features, pre_logits=False)``: the pooled embedding (B, num_features) or class logits;
- ``forward_pyramid(images)``: a list of feature maps (B, C_i, H / s_i, W / s_i), one per level of
  ``feature_info`` (channels C_i = ``out_channels[i]``, stride s_i = ``strides[i]``), for detection and
  stereo;
- ``forward(images)`` = ``forward_head(forward_features(images))``.
``complexity(image_size)`` reports parameters and GMACs with :func:`count_complexity`, the one counter
used for every backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def maps_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C) in row-major grid order (the token mixer contract)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_maps(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).unflatten(2, hw)


@dataclass(frozen=True)
class FeatureLevel:
    """One level of a backbone's feature pyramid."""

    channels: int
    stride: int


@dataclass(frozen=True)
class Complexity:
    """Parameter count and multiply-accumulates of one forward pass at one image size."""

    params: int
    macs: int
    image_size: tuple[int, int]

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def __str__(self) -> str:
        return f"{self.params_m:.2f}M params, {self.gmacs:.3f} GMACs at {self.image_size[0]}x{self.image_size[1]}"


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # PyTorch's counter knows the CUDA fused-attention kernels but not the CPU one.
    return sdpa_flop_count(query, key, value)


_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@torch.no_grad()
def count_complexity(model: nn.Module, image_size: int | tuple[int, int] = 224, in_chans: int = 3) -> Complexity:
    """Parameters and MACs of ``model(images)`` for one image of `image_size`.

    MACs are half the FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts: matrix products,
    convolutions and attention kernels (the convention of the papers' GMAC figures, as fvcore counts).
    Element-wise work (activations, normalisation, softmax, FFTs) is not counted. The model runs once
    in eval mode on the device of its parameters; its training mode is restored afterwards.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
            model(torch.zeros(1, in_chans, *size, device=device))
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return Complexity(params=params, macs=counter.get_total_flops() // 2, image_size=size)


class Backbone(nn.Module):
    """Base class of every registered backbone (see the module docstring for the interface)."""

    num_features: int
    feature_info: list[FeatureLevel]
    #: Sub-modules that only ``forward_head`` uses (the classifier); :meth:`remove_classifier` drops them.
    classifier_parts: tuple[str, ...] = ()
    classifier_removed: bool = False

    @property
    def out_channels(self) -> list[int]:
        return [level.channels for level in self.feature_info]

    @property
    def strides(self) -> list[int]:
        return [level.stride for level in self.feature_info]

    def forward_features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        raise NotImplementedError

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        if self.classifier_removed:
            raise RuntimeError(f"{type(self).__name__}: this backbone's classifier was removed (it feeds a dense "
                               "prediction task); use forward_pyramid or forward_features")
        return self.forward_head(self.forward_features(images))

    def remove_classifier(self) -> None:
        """Drop the modules only the classifier uses, for tasks that read ``forward_pyramid`` (stereo, detection).

        Parameters that never reach the loss would make DDP wait for gradients that never come, and be
        saved and counted for nothing.
        """
        for name in self.classifier_parts:
            setattr(self, name, None)
        self.classifier_removed = True

    def complexity(self, image_size: int | tuple[int, int] = 224) -> Complexity:
        return count_complexity(self, image_size)

    def load_pretrained(self, source: str) -> None:
        """Load weights from `source` (a file, a lattn ``.ckpt`` or a timm name; see
        ``timm_weights.load_pretrained``), keeping what was loaded in ``self.load_report``.

        Raises:
            ValueError: not one tensor of `source` matches this backbone's parameter names.
        """
        from .timm_weights import load_pretrained

        self.load_report = load_pretrained(self, source)
        if not self.load_report.loaded:
            raise ValueError(
                f"{type(self).__name__}: no tensor of {source} matches this backbone's parameter names (e.g. "
                f"{next(iter(self.state_dict()))!r}); it holds weights of another architecture"
            )
