"""Pretrained weights for lattn backbones: timm model names, local weight files, lattn checkpoints.

``pretrained`` may be
- a path to a local file: ``.safetensors``, a PyTorch file (``.pth``, ``.pt``, ``.bin``; a bare state
  dict or one wrapped under ``state_dict`` / ``model``, EMA weights preferred, as timm saves them), or a
  lattn/Lightning ``.ckpt`` (the backbone's weights are found under their ``...backbone.`` prefix);
- a timm model name (e.g. ``vit_small_patch16_224``), fetched through timm's own pretrained loader
  (this needs network access to the Hugging Face hub; offline, save the weights to a file first).

Because lattn's ViT uses timm's parameter names, a softmax ViT's weights load into the same network
with any attention mechanism whose parameters correspond: q, k, v and output projections are shared;
parameters that only the new mechanism has (Linformer's projections, Nystromformer's convolution) keep
their initialisation and are reported. Learned position embeddings are resampled to the model's grid;
a classifier head of another class count is left initialised. Any other shape mismatch is an error
naming the key and both shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import load_state_dict
from torch import Tensor, nn

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class LoadReport:
    """What loading pretrained weights did, key by key."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: kept initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored
    resampled: list[str] = field(default_factory=list)
    reinitialised_head: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"Loaded {len(self.loaded)} tensors from {self.source}"]
        if self.resampled:
            lines.append(f"  resampled to the model's grid: {', '.join(self.resampled)}")
        if self.reinitialised_head:
            lines.append(f"  classifier head left initialised (other class count): {', '.join(self.reinitialised_head)}")
        if self.missing:
            lines.append(f"  initialised, not in the weights: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  ignored, not in the model: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def read_state_dict(source: str) -> dict[str, Tensor]:
    """The state dict named by `source`: a local weight file or a timm model name."""
    path = Path(source).expanduser()
    if path.is_file():
        try:
            # Lightning checkpoints also hold hyperparameters and loop state: not weights-only.
            state = load_state_dict(str(path), weights_only=path.suffix != ".ckpt")
        except Exception as error:
            raise ValueError(f"could not read pretrained weights from {path}: {error}") from error
        return strip_to_backbone(state)
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in source:
        raise FileNotFoundError(f"pretrained weights file {path} does not exist")
    if not timm.is_model(source):
        raise ValueError(
            f"pretrained={source!r} is neither an existing file nor a timm model name "
            f"(files: {', '.join(CHECKPOINT_SUFFIXES)})"
        )
    try:
        return timm.create_model(source, pretrained=True).state_dict()
    except Exception as error:
        raise RuntimeError(
            f"timm could not fetch the pretrained weights of {source!r} ({type(error).__name__}: {error}). "
            f"Without network access, save them on a connected machine with "
            f"torch.save(timm.create_model({source!r}, pretrained=True).state_dict(), 'weights.pth') "
            f"and pass the file's path as pretrained."
        ) from error


def strip_to_backbone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys of a task checkpoint ('model.backbone.blocks.0...') reduced to the backbone's own."""
    marker = "backbone."
    prefixes = {key[: key.index(marker) + len(marker)] for key in state if marker in key}
    if len(prefixes) != 1:
        return state
    prefix = prefixes.pop()
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _adapt_position_embedding(model: nn.Module, state: dict[str, Tensor], report: LoadReport) -> None:
    if "pos_embed" not in state or getattr(model, "pos_embed", None) is None:
        return
    source, target = state["pos_embed"], model.pos_embed
    if source.shape == target.shape or source.shape[-1] != target.shape[-1]:
        return  # same grid, or another width (reported as a shape mismatch with the other keys)
    file_prefix = 1 if "cls_token" in state else 0
    grid_tokens = source.shape[1] - file_prefix
    side = round(grid_tokens**0.5)
    if side * side != grid_tokens:
        raise ValueError(
            f"pretrained key 'pos_embed' has shape {tuple(source.shape)}, the model's is {tuple(target.shape)}, "
            f"and the file's grid is not square, so it cannot be resampled"
        )
    grid = resample_abs_pos_embed(source[:, file_prefix:], list(model.grid_size), [side, side], num_prefix_tokens=0)
    prefix = source[:, :file_prefix][:, : model.num_prefix_tokens]
    state["pos_embed"] = torch.cat([prefix, grid], dim=1)
    report.resampled.append(f"pos_embed {side}x{side} -> {model.grid_size[0]}x{model.grid_size[1]}")


def load_pretrained(model: nn.Module, source: str) -> LoadReport:
    """Load `source` (see the module docstring) into `model`, log and return what happened."""
    state = dict(read_state_dict(source))
    report = LoadReport(source=source)
    _adapt_position_embedding(model, state, report)
    own = model.state_dict()
    for key in getattr(model, "pretrained_head_keys", HEAD_KEYS):
        if key in state and key in own and state[key].shape != own[key].shape:
            del state[key]
            report.reinitialised_head.append(key)
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"pretrained key {key!r} has shape {tuple(value.shape)} in {source} but "
                f"{tuple(own[key].shape)} in the model; the architectures differ (check embed_dim, depth, "
                f"num_heads, patch_size and the attention mechanism)"
            )
    result = model.load_state_dict(state, strict=False)
    report.missing = [key for key in result.missing_keys if key not in report.reinitialised_head]
    report.unexpected = list(result.unexpected_keys)
    report.loaded = [key for key in state if key not in result.unexpected_keys]
    log.info("%s", report)
    return report
