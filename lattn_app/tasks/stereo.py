"""StereoTask: disparity estimation on Scene Flow-format data with the attention stereo network.

Training minimises PSMNet's multi-output smooth-L1 loss over valid pixels (0 < ground truth <
max_disparity), one term per hourglass output weighted by ``loss_weights``. Validation and test report
EPE, bad-1/2/3 and D1 (lattn_app.metrics.stereo, averaged per pixel over the whole split) and, for
reference, ``*_baseline_epe``: the EPE of the trivial predictor that outputs each image's mean true
disparity everywhere. TensorBoard gets the left image, ground truth, prediction and error map of the
first validation batch every validation run. ``predict`` returns each disparity map with its name;
:class:`StereoPredictionWriter` saves it as PFM, 16-bit PNG and a colour-mapped PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor

from ..data.io import colorize_disparity, write_disparity_png16, write_pfm
from ..metrics.stereo import EndPointError, stereo_metrics, valid_disparity_mask
from ..models.stereo import StereoNet
from .base import IMAGENET_MEAN, IMAGENET_STD, LattnTask

PSMNET_LOSS_WEIGHTS = (0.5, 0.7, 1.0)


class StereoTask(LattnTask):
    """Stereo matching: PSMNet with registry backbone and attention over 1/4-resolution features."""

    def __init__(
        self,
        max_disparity: int = 192,
        backbone: str = "pyramid_tiny",
        backbone_options: dict[str, Any] | None = None,
        attention: str = "efficient",
        attention_options: dict[str, Any] | None = None,
        attention_depth: int = 1,
        attention_heads: int = 4,
        cross_attention: bool = True,
        rope: bool = False,
        feature_dim: int = 64,
        cost_volume: str = "gwc",
        groups: int = 16,
        volume_channels: int = 32,
        num_hourglasses: int = 3,
        img_size: tuple[int, int] = (256, 512),
        loss_weights: Sequence[float] | None = None,
        num_logged_images: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.01,
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_nonfinite_loss: str = "error",
    ) -> None:
        """
        Args:
            max_disparity: largest disparity the cost volume covers (a multiple of 16); linked from
                ``data.max_disparity`` by the CLI. Pixels with ground truth outside (0, max_disparity)
                are neither trained on nor scored.
            backbone: registered backbone giving stride-4 features (``lattn list backbones``); every
                level of its pyramid is fused into one stride-4 map.
            backbone_options: the backbone's own options (e.g. ``num_stages``, ``pretrained``); its
                ``attention`` defaults to `attention`.
            attention: registered mechanism of the stereo attention layers (``lattn list attention``).
            attention_options: that mechanism's own options.
            attention_depth: number of self-attention (+ cross-attention) layers over the 1/4 features; 0: none.
            attention_heads: heads of those layers.
            cross_attention: also attend from each view to the other (the mechanism must support it).
            rope: 2D rotary position embedding in the attention layers (mechanisms that support it).
            feature_dim: channels of the fused stride-4 features.
            cost_volume: ``gwc`` (group-wise correlation) or ``concat`` (PSMNet's concatenation).
            groups: correlation groups of ``gwc``.
            volume_channels: channels of the 3D aggregation network.
            num_hourglasses: stacked 3D hourglasses (PSMNet: 3); each one's output is supervised.
            img_size: training image size; used by fixed-grid mechanisms (linformer, mixer) only.
            loss_weights: weight of each hourglass output in the loss; default PSMNet's (0.5, 0.7, 1.0),
                its last ``num_hourglasses`` entries for fewer hourglasses.
            num_logged_images: images of the first validation batch shown in TensorBoard.
        """
        super().__init__(lr, weight_decay, warmup_epochs, min_lr_ratio, layer_decay, freeze_backbone, mean, std,
                         on_nonfinite_loss)
        self.save_hyperparameters()
        if loss_weights is None:
            loss_weights = PSMNET_LOSS_WEIGHTS[-num_hourglasses:] if num_hourglasses <= 3 else [1.0] * num_hourglasses
        if len(loss_weights) != num_hourglasses:
            raise ValueError(f"loss_weights needs one weight per hourglass ({num_hourglasses}); got {list(loss_weights)}")
        self.loss_weights = list(loss_weights)
        self.max_disparity = max_disparity
        self.num_logged_images = num_logged_images
        self.net = StereoNet(
            max_disparity, backbone, backbone_options, attention, attention_options, attention_depth,
            attention_heads, cross_attention, rope, feature_dim, cost_volume, groups, volume_channels,
            num_hourglasses, tuple(img_size),
        )
        self.backbone = self.net.backbone
        self.val_metrics = stereo_metrics(max_disparity, "val_")
        self.test_metrics = stereo_metrics(max_disparity, "test_")
        self.val_baseline = EndPointError(max_disparity)
        self.test_baseline = EndPointError(max_disparity)

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        """Views in [0, 1] (B, 3, H, W) of any size -> final disparity (B, H, W) in pixels."""
        return self.net(self.normalize(left), self.normalize(right))[-1]

    def training_loss(self, batch: dict[str, Any]) -> Tensor:
        target = batch["disparity"]
        outputs = self.net(self.normalize(batch["left"]), self.normalize(batch["right"]))
        valid = valid_disparity_mask(target, self.max_disparity)
        if not valid.any():  # a crop without a single valid pixel: nothing to learn, keep the graph
            return sum(output.sum() for output in outputs) * 0.0
        loss = sum(
            weight * F.smooth_l1_loss(output[valid], target[valid]) for weight, output in zip(self.loss_weights, outputs)
        )
        self.log("train_epe", (outputs[-1].detach()[valid] - target[valid]).abs().mean(), prog_bar=True)
        return loss

    def _evaluate(self, batch: dict[str, Any], metrics, baseline: EndPointError) -> Tensor:
        prediction = self(batch["left"], batch["right"])
        target = batch["disparity"]
        metrics.update(prediction, target)
        baseline.update(mean_disparity_baseline(target, self.max_disparity), target)
        return prediction

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prediction = self._evaluate(batch, self.val_metrics, self.val_baseline)
        self.log_dict(self.val_metrics)
        self.log("val_baseline_epe", self.val_baseline)
        if batch_idx == 0:
            self.log_images(batch, prediction)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_baseline)
        self.log_dict(self.test_metrics)
        self.log("test_baseline_epe", self.test_baseline)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"name": list(batch["name"]), "disparity": self(batch["left"], batch["right"]).float().cpu()}

    def on_fit_end(self) -> None:
        self.print_summary()

    @rank_zero_only
    def print_summary(self) -> None:
        """The end-of-training line: validation EPE next to the trivial baseline's."""
        metrics = self.trainer.callback_metrics
        if "val_epe" not in metrics or "val_baseline_epe" not in metrics:
            return
        epe, baseline = float(metrics["val_epe"]), float(metrics["val_baseline_epe"])
        line = (f"Validation EPE {epe:.3f} px; trivial baseline (each image's mean disparity) {baseline:.3f} px; "
                f"ratio {epe / baseline:.3f}")
        checkpoint = self.trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_path and checkpoint.best_model_score is not None:
            line += f"\nBest checkpoint: {checkpoint.best_model_path} ({checkpoint.monitor} {float(checkpoint.best_model_score):.3f})"
        print(line, flush=True)

    @rank_zero_only
    def log_images(self, batch: dict[str, Any], prediction: Tensor) -> None:
        """Left image, ground truth, prediction and |error| (0..5 px) of a few samples to TensorBoard."""
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        for index in range(min(self.num_logged_images, prediction.shape[0])):
            target = batch["disparity"][index].float().cpu().numpy()
            predicted = prediction[index].float().cpu().numpy()
            valid = valid_disparity_mask(batch["disparity"][index], self.max_disparity).cpu().numpy()
            error = np.where(valid, np.abs(predicted - target), np.nan)
            panels = {
                "left": (batch["left"][index].float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                "ground_truth": colorize_disparity(np.where(valid, target, np.nan), self.max_disparity),
                "prediction": colorize_disparity(predicted, self.max_disparity),
                "error": colorize_disparity(error, 5.0),
            }
            for name, image in panels.items():
                self.logger.experiment.add_image(f"val/{index}/{name}", image, self.global_step, dataformats="HWC")


def mean_disparity_baseline(target: Tensor, max_disparity: float) -> Tensor:
    """Each image's mean valid disparity everywhere: the trivial predictor the model must beat."""
    valid = valid_disparity_mask(target, max_disparity)
    total = torch.where(valid, target, torch.zeros_like(target)).flatten(1).sum(dim=1)
    mean = total / valid.flatten(1).sum(dim=1).clamp(min=1)
    return mean.view(-1, *([1] * (target.dim() - 1))).expand_as(target)


class StereoPredictionWriter(BasePredictionWriter):
    """Saves every predicted disparity as ``<name>.pfm``, ``<name>_disp16.png`` and ``<name>_color.png``.

    ``<name>`` is the left image's path relative to the data root (or its file name for pairs given
    directly) without its extension, under `output_dir`. The 16-bit PNG stores round(256 * disparity)
    (the KITTI convention); the colour map spans 0 .. max_disparity.
    """

    def __init__(self, output_dir: str = "predictions", max_disparity: float | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.max_disparity = max_disparity

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        max_disparity = self.max_disparity or getattr(pl_module, "max_disparity", None)
        for name, disparity in zip(prediction["name"], prediction["disparity"]):
            stem = self.output_dir / Path(name).with_suffix("")
            stem.parent.mkdir(parents=True, exist_ok=True)
            array = disparity.numpy()
            write_pfm(stem.with_name(stem.name + ".pfm"), array)
            write_disparity_png16(stem.with_name(stem.name + "_disp16.png"), array)
            Image.fromarray(colorize_disparity(array, max_disparity)).save(stem.with_name(stem.name + "_color.png"))

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"Predictions written to {self.output_dir.resolve()}", flush=True)
