"""Attention mechanisms (token mixers) of lattn, found by name in the registry.

    >>> from lattn_app.attention import create_attention, list_attentions
    >>> attn = create_attention("efficient", dim=64, num_heads=4)
    >>> y = attn(x, hw=(12, 20))          # x: (B, prefix + 12*20, 64) -> same shape

Every mechanism follows the contract of :class:`~lattn_app.attention.base.TokenMixer`.
"""

from __future__ import annotations

from torch import nn

from ..registry import ATTENTIONS, Entry
from . import care, coupling, efficient, fnet, linformer, mixer, nystrom, performer, softmax  # noqa: F401 (register)
from .base import QKVAttention, TokenMixer
from .rope import RotaryEmbedding2D


def create_attention(name: str, dim: int, num_heads: int = 8, **options) -> nn.Module:
    """Build the registered mechanism `name` for tokens of width `dim` split into `num_heads` heads.

    `options` are the mechanism's own keyword arguments (see ``lattn list`` or its docstring); an
    unknown option or name raises an error that names the closest valid one.
    """
    return ATTENTIONS.create(name, dim=dim, num_heads=num_heads, **options)


def list_attentions() -> list[str]:
    """Names of every registered mechanism, lattn's own and those of installed plug-ins."""
    return ATTENTIONS.names()


def attention_info(name: str) -> Entry:
    """What the registry knows about `name`: description, complexity, RoPE/cross-attention support."""
    return ATTENTIONS.get(name)


__all__ = [
    "QKVAttention",
    "RotaryEmbedding2D",
    "TokenMixer",
    "attention_info",
    "create_attention",
    "list_attentions",
]
