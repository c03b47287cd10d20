"""What every lattn task shares: input normalisation, the optimiser recipe and the non-finite-loss guard.

Optimiser: AdamW over parameter groups without weight decay for biases, norms and the backbone's
``no_weight_decay()`` names; optionally layer-wise learning-rate decay over the backbone's blocks
(timm's ``param_groups_layer_decay``, driven by the backbone's ``group_matcher``). Schedule: linear
warm-up from 0 over ``warmup_epochs``, then cosine decay to ``min_lr_ratio * lr``, stepped every
optimiser step.

A training loss that is NaN or infinite stops the run with an error naming the step
(``on_nonfinite_loss="error"``, the default; the last saved checkpoint stays as it was) or skips that
optimiser step (``"skip"``, counted in the ``train_skipped_steps`` log).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn

from ..registry import check_choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NONFINITE_POLICIES = ("error", "skip")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor at `step`: linear warm-up to 1, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LattnTask(LightningModule):
    """Base LightningModule of the lattn tasks. Subclasses set ``self.backbone`` and implement ``training_loss``."""

    backbone: nn.Module

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.01,
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_nonfinite_loss: str = "error",
    ) -> None:
        super().__init__()
        check_choice("on_nonfinite_loss", on_nonfinite_loss, NONFINITE_POLICIES)
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] (e.g. 0.75) or null; got {layer_decay}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.min_lr_ratio = min_lr_ratio
        self.layer_decay = layer_decay
        self.freeze_backbone = freeze_backbone
        self.on_nonfinite_loss = on_nonfinite_loss
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.skipped_steps = 0

    def normalize(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (what the datamodules give) -> normalised network input."""
        return (images - self.mean) / self.std

    # --- training ---------------------------------------------------------------------------------
    def training_loss(self, batch: Any) -> Tensor:
        """The loss of one training batch (subclasses also log their training metrics here)."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            if self.on_nonfinite_loss == "skip":
                self.skipped_steps += 1
                self.log("train_skipped_steps", float(self.skipped_steps))
                return None  # Lightning skips the backward pass and the optimiser step
            raise FloatingPointError(
                f"the training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); training stopped and the last saved checkpoint is kept. Lower model.lr, "
                f"use bf16-mixed instead of 16-mixed, or set model.on_nonfinite_loss: skip"
            )
        self.log("train_loss", loss, prog_bar=True, batch_size=self.batch_size_of(batch))
        return loss

    def batch_size_of(self, batch: Any) -> int | None:
        """Samples in `batch`, for epoch averages of logged values; None: Lightning finds it (first tensor's length)."""
        return None

    def setup(self, stage: str) -> None:
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        if self.freeze_backbone:
            self.backbone.eval()  # frozen means frozen batch-norm statistics too

    # --- optimisation -------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decay / no decay, with per-group lr scales under layer-wise decay."""
        skip = set(getattr(self.backbone, "no_weight_decay", lambda: set())())
        if self.layer_decay is None or self.freeze_backbone:
            groups = param_groups_weight_decay(self, self.weight_decay, no_weight_decay_list=[f"backbone.{n}" for n in skip])
        else:
            if not hasattr(self.backbone, "group_matcher"):
                raise ValueError(f"layer_decay needs a backbone with group_matcher(); {type(self.backbone).__name__} has none")
            groups = param_groups_layer_decay(self.backbone, self.weight_decay, no_weight_decay_list=skip,
                                              layer_decay=self.layer_decay)
            in_backbone = {id(p) for p in self.backbone.parameters()}
            heads = nn.ParameterList(p for p in self.parameters() if id(p) not in in_backbone)
            groups += param_groups_weight_decay(heads, self.weight_decay)
        trainable = []
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
            if group["params"]:
                group["lr"] = self.lr * group.pop("lr_scale", 1.0)
                trainable.append(group)
        return trainable

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, weight_decay=self.weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup_steps = int(round(self.warmup_epochs * total_steps / max_epochs))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
