"""Backbones of lattn, found by name in the registry (``lattn list backbones``).

    >>> from lattn_app.backbones import create_backbone
    >>> model = create_backbone("vit_small", attention="efficient", num_classes=10)
"""

from __future__ import annotations

from torch import nn

from ..registry import BACKBONES
from . import care, couplformer, pyramid, resnet_attention, vit  # noqa: F401 (register themselves)
from .base import Backbone, Complexity, FeatureLevel, count_complexity


def create_backbone(name: str, **options) -> nn.Module:
    """Build the registered backbone `name`; options are the backbone's own keyword arguments."""
    return BACKBONES.create(name, **options)


def list_backbones() -> list[str]:
    """Names of every registered backbone, lattn's own and those of installed plug-ins."""
    return BACKBONES.names()


__all__ = ["Backbone", "Complexity", "FeatureLevel", "count_complexity", "create_backbone", "list_backbones"]
