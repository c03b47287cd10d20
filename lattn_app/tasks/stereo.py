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

import logging
from collections.abc import Sequence
from dataclasses import asdict
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
from ..models.stereo import StereoNet, StereoNetOptions, check_max_disparity
from .base import LattnTask

log = logging.getLogger(__name__)

PSMNET_LOSS_WEIGHTS = (0.5, 0.7, 1.0)
DEFAULT_MAX_DISPARITY = 192  # PSMNet's range on Scene Flow


class StereoTask(LattnTask):
    """Stereo matching: PSMNet with registry backbone and attention over 1/4-resolution features.

    Args:
        max_disparity: largest disparity the cost volume covers (a multiple of 16). Pixels with ground
            truth outside (0, max_disparity) are neither trained on nor scored. None (default): the
            training data's own range where it states one (the embedded synthetic set: 48), else
            PSMNet's 192; from a checkpoint (``--ckpt_path``), the value it was trained with. The
            value used is stored in the checkpoint and in the run's saved config.
        backbone: registered backbone giving stride-4 features (``lattn list backbones``); every
            level of its pyramid is fused into one stride-4 map.
        backbone_options: the backbone's own options (e.g. ``num_stages``, ``pretrained``); its
            ``attention`` defaults to `attention`.
        attention: registered mechanism of the stereo attention layers and of the backbone
            (``lattn list attention``).
        attention_options: that mechanism's own options.
        net: the rest of the network's architecture (:class:`~lattn_app.models.stereo.StereoNetOptions`:
            attention depth and heads, cross-attention, cost volume, hourglasses, ...).
        loss_weights: weight of each hourglass output in the loss; default PSMNet's (0.5, 0.7, 1.0),
            its last ``net.num_hourglasses`` entries for fewer hourglasses.
        num_logged_images: images of the first validation batch shown in TensorBoard.
        **kwargs: the training options of :class:`~lattn_app.tasks.base.LattnTask` (``lr``, ...).
    """

    def __init__(
        self,
        max_disparity: int | None = None,
        backbone: str = "pyramid_tiny",
        backbone_options: dict[str, Any] | None = None,
        attention: str = "efficient",
        attention_options: dict[str, Any] | None = None,
        net: StereoNetOptions = StereoNetOptions(),  # noqa: B008 (frozen: never modified)
        loss_weights: Sequence[float] | None = None,
        num_logged_images: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        net = StereoNetOptions.of(net)
        self.save_hyperparameters()
        self.hparams["net"] = asdict(net)  # checkpoints hold plain values (they load with weights_only=True)
        num_hourglasses = net.num_hourglasses
        if loss_weights is None:
            loss_weights = PSMNET_LOSS_WEIGHTS[-num_hourglasses:] if num_hourglasses <= 3 else [1.0] * num_hourglasses
        if len(loss_weights) != num_hourglasses:
            raise ValueError(f"loss_weights needs one weight per hourglass ({num_hourglasses}); got {list(loss_weights)}")
        self.loss_weights = list(loss_weights)
        self.num_logged_images = num_logged_images
        # Built at PSMNet's range when max_disparity is unset: no weight depends on it (set_max_disparity).
        self.net = StereoNet(max_disparity or DEFAULT_MAX_DISPARITY, backbone, backbone_options, attention,
                             attention_options, net)
        self.backbone = self.net.backbone
        self.val_metrics = stereo_metrics(None, "val_")
        self.test_metrics = stereo_metrics(None, "test_")
        self.val_baseline = EndPointError()
        self.test_baseline = EndPointError()
        self.max_disparity: int | None = None
        if max_disparity is not None:
            self.set_max_disparity(max_disparity)

    def set_max_disparity(self, max_disparity: int) -> None:
        """Use `max_disparity` for the cost volume, the loss and the metrics, and record it as a hyperparameter."""
        check_max_disparity(max_disparity)
        self.max_disparity = max_disparity
        self.net.max_disparity = max_disparity
        self.hparams["max_disparity"] = max_disparity
        for metric in (*self.val_metrics.values(), *self.test_metrics.values(), self.val_baseline, self.test_baseline):
            metric.max_disparity = max_disparity

    def fill_from_data(self, datamodule: Any) -> dict[str, Any]:
        if self.max_disparity is not None:
            return {}
        data_range = getattr(datamodule, "disparity_range", None)
        max_disparity = DEFAULT_MAX_DISPARITY if data_range is None else int(data_range)
        log.info("max_disparity %d (%s)", max_disparity,
                 "PSMNet's range; the data states none" if data_range is None else "the training data's range")
        self.set_max_disparity(max_disparity)
        return {"max_disparity": max_disparity}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.max_disparity is None:  # unset: the value the checkpoint was trained with
            trained = (checkpoint.get("hyper_parameters") or {}).get("max_disparity")
            self.set_max_disparity(int(trained) if trained is not None else DEFAULT_MAX_DISPARITY)

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

    def summary_line(self) -> str | None:
        """Validation EPE next to the trivial baseline's."""
        metrics = self.trainer.callback_metrics
        if "val_epe" not in metrics or "val_baseline_epe" not in metrics:
            return None
        epe, baseline = float(metrics["val_epe"]), float(metrics["val_baseline_epe"])
        return (f"Validation EPE {epe:.3f} px; trivial baseline (each image's mean disparity) {baseline:.3f} px; "
                f"ratio {epe / baseline:.3f}")

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
    (the KITTI convention); the colour map spans 0 .. the model's max_disparity.
    """

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        max_disparity = getattr(pl_module, "max_disparity", None)  # the model's range (its checkpoint's)
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
