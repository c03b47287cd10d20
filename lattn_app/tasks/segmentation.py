"""SegmentationTask: semantic segmentation (ADE20K, Cityscapes, a user's folders) on registry backbones.

The network is Semantic FPN over a hierarchical backbone's pyramid, or a simple pyramid + the same head
for an isotropic ViT (:mod:`lattn_app.models.segmentation`); logits are upsampled to the input size.
Training minimises the per-pixel cross-entropy over the labelled pixels (the ignore index 255 marks the
others); the optimiser and schedule are :class:`~lattn_app.tasks.base.LattnTask`'s.

Inference at any size: ``inference="whole"`` runs the whole image at once; ``"slide"`` runs windows of
``window`` pixels every ``stride`` pixels and averages the logits where windows overlap, so large frames
(Cityscapes' 2048 x 1024) run in the memory of one window. Evaluation predictions are resized to each
mask's original size before scoring.

Metrics (:mod:`lattn_app.metrics.segmentation`, over the whole split, summed over DDP processes):
``{val,test}_miou``, ``_pixel_acc`` and the per-class IoU ``_iou/<label>_<name>`` (also a table in
TensorBoard's text tab), and the trivial baseline ``_baseline_miou`` / ``_baseline_pixel_acc``: every pixel
predicted as the training set's most frequent class (counted over the training masks when training
starts, and stored in the checkpoint). TensorBoard gets a few image / ground truth / prediction overlays
every validation. Images without any labelled pixel add nothing to the metrics or the loss; their count
is logged.

``predict`` returns each prediction at its image's original size in the dataset's own class ids
(``category_ids``); :class:`SegmentationPredictionWriter` saves it as a label PNG and a colour overlay.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor
from torchmetrics import SumMetric

from ..data.io import read_image
from ..data.segmentation.dataset import IGNORE_INDEX
from ..metrics.segmentation import SegmentationMetrics, trivial_baseline
from ..models.segmentation import Segmenter, SegmenterOptions
from ..registry import check_choice
from .base import LattnTask, backbone_options_with_attention
from .prediction_writer import LattnPredictionWriter

log = logging.getLogger(__name__)

__all__ = ["SegmentationPredictionWriter", "SegmentationTask", "class_palette", "colorize_labels"]

INFERENCE_MODES = ("whole", "slide")


def class_palette(num_classes: int) -> np.ndarray:
    """A fixed colour per label (num_classes + 1, 3) uint8; the last row (unlabelled) is black."""
    colours = np.random.default_rng(20250).integers(30, 256, (num_classes, 3), dtype=np.uint8)
    return np.concatenate([colours, np.zeros((1, 3), np.uint8)])


def colorize_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels (H, W) 0..K-1 (anything else: unlabelled) -> RGB uint8 (H, W, 3)."""
    palette = class_palette(num_classes)
    index = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    return palette[index]


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """An RGB uint8 image with the colours of `labels` blended over it (unlabelled pixels left as they are)."""
    colours = colorize_labels(labels, num_classes).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colours * alpha
    labelled = ((labels >= 0) & (labels < num_classes))[..., None]
    return np.where(labelled, blend, image).round().astype(np.uint8)


def _metric_name(label: int, name: str) -> str:
    return f"{label:03d}_" + re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


class SegmentationTask(LattnTask):
    """Semantic segmentation with Semantic FPN on a registry backbone (see the module docstring).

    Args:
        num_classes: classes K; linked from ``data.num_classes``.
        class_names: the name of each label; linked from the datamodule.
        category_ids: the value of each label in the dataset's mask files (ADE20K: label + 1; Cityscapes:
            its labelIds), which predictions are saved with; linked from the datamodule. Default 0..K-1.
        backbone: registered backbone (``lattn list backbones``): hierarchical ones get Semantic FPN,
            isotropic ones a simple pyramid (``net.head``).
        backbone_options: the backbone's own options (e.g. ``pretrained``, ``drop_path_rate``).
        attention: registered mechanism of the backbone (``lattn list attention``).
        attention_options: that mechanism's own options.
        net: the rest of the network (:class:`~lattn_app.models.segmentation.SegmenterOptions`: head kind,
            FPN and head widths, normalisation, dropout).
        inference: ``whole`` (the whole image at once) or ``slide`` (windows, overlaps averaged) for
            validation, test and predict.
        window: (height, width) of the sliding windows.
        stride: (vertical, horizontal) step between windows; at most the window size.
        num_logged_images: validation images drawn to TensorBoard (image, ground truth, prediction).
        **kwargs: the training options of :class:`~lattn_app.tasks.base.LattnTask` (``lr``, ...).
    """

    compiled_part = "net"

    def __init__(
        self,
        num_classes: int = 150,
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        backbone: str = "pyramid_tiny",
        backbone_options: dict[str, Any] | None = None,
        attention: str = "efficient",
        attention_options: dict[str, Any] | None = None,
        net: SegmenterOptions = SegmenterOptions(),  # noqa: B008 (frozen: never modified)
        inference: Literal["whole", "slide"] = "whole",
        window: tuple[int, int] = (512, 512),
        stride: tuple[int, int] = (341, 341),
        num_logged_images: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        net = SegmenterOptions.of(net)
        self.save_hyperparameters()
        self.hparams["net"] = asdict(net)  # checkpoints hold plain values (they load with weights_only=True)
        check_choice("inference", inference, INFERENCE_MODES)
        window, stride = tuple(int(v) for v in window), tuple(int(v) for v in stride)
        if len(window) != 2 or len(stride) != 2 or min(window) < 1 or min(stride) < 1:
            raise ValueError(f"window and stride must be (height, width) of positive pixels; got {window}, {stride}")
        if stride[0] > window[0] or stride[1] > window[1]:
            raise ValueError(f"stride {list(stride)} must not exceed window {list(window)} (pixels between windows "
                             "would get no prediction)")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        if category_ids is not None and len(category_ids) != num_classes:
            raise ValueError(f"category_ids has {len(category_ids)} ids but num_classes is {num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.category_ids = [int(i) for i in category_ids] if category_ids is not None else list(range(num_classes))
        self.inference, self.window, self.stride = inference, window, stride
        self.num_logged_images = num_logged_images
        options = backbone_options_with_attention(backbone, backbone_options, attention, attention_options)
        self.net = Segmenter(num_classes, backbone, options, net)
        self.backbone = self.net.backbone
        # Labelled pixels per class of the training masks (the trivial baseline's class); kept in checkpoints.
        self.register_buffer("train_class_pixels", torch.zeros(num_classes, dtype=torch.int64))
        self.val_metrics = SegmentationMetrics(num_classes, IGNORE_INDEX)
        self.test_metrics = SegmentationMetrics(num_classes, IGNORE_INDEX)
        self.unlabelled = {stage: SumMetric() for stage in ("train", "val", "test")}
        for stage, metric in self.unlabelled.items():
            self.add_module(f"{stage}_unlabelled_images", metric)

    # --- inference ------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) -> logits (B, K, H, W), by the configured inference mode."""
        normalized = self.normalize(images)
        if self.inference == "whole":
            return self.net(normalized)
        return torch.cat([self.slide(image[None]) for image in normalized])

    def slide(self, image: Tensor) -> Tensor:
        """Sliding-window logits (1, K, H, W) of one normalised image: windows every `stride`, overlaps averaged."""
        _, _, height, width = image.shape
        (window_h, window_w), (stride_h, stride_w) = self.window, self.stride
        rows = max(height - window_h + stride_h - 1, 0) // stride_h + 1
        cols = max(width - window_w + stride_w - 1, 0) // stride_w + 1
        logits = image.new_zeros((1, self.num_classes, height, width))
        counts = image.new_zeros((1, 1, height, width))
        for row in range(rows):
            for col in range(cols):
                y2, x2 = min(row * stride_h + window_h, height), min(col * stride_w + window_w, width)
                y1, x1 = max(y2 - window_h, 0), max(x2 - window_w, 0)
                logits[..., y1:y2, x1:x2] += self.net(image[..., y1:y2, x1:x2])
                counts[..., y1:y2, x1:x2] += 1
        return logits / counts

    def predict_labels(self, images: Tensor | Sequence[Tensor], sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """Labels (H_i, W_i) of each image, its logits resized to `sizes[i]` (a mask's or the original image's size)."""
        if isinstance(images, Tensor) and self.inference == "whole":
            batches = [self(images)]  # one size: one batched forward pass
        else:
            batches = [self(image[None]) for image in images]
        logits = [row for batch in batches for row in batch]
        labels = []
        for row, size in zip(logits, sizes):
            if tuple(row.shape[-2:]) != tuple(size):
                row = F.interpolate(row[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
            labels.append(row.argmax(dim=0))
        return labels

    # --- training -------------------------------------------------------------------------------------
    def training_loss(self, batch: dict[str, Any]) -> Tensor:
        images, masks = batch["image"], batch["mask"]
        logits = self.net(self.normalize(images))
        labelled = masks != IGNORE_INDEX
        self.unlabelled["train"].update((~labelled.flatten(1).any(dim=1)).sum())
        if not labelled.any():  # crops without a single labelled pixel: nothing to learn, keep the graph
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
        correct = (logits.detach().argmax(dim=1) == masks) & labelled
        self.log("train_pixel_acc", correct.sum() / labelled.sum(), prog_bar=True, batch_size=len(images))
        return loss

    def on_train_start(self) -> None:
        super().on_train_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if int(self.train_class_pixels.sum()) == 0 and hasattr(datamodule, "training_class_pixels"):
            counts = torch.as_tensor(datamodule.training_class_pixels(), dtype=torch.int64)
            if counts.shape == self.train_class_pixels.shape:
                self.train_class_pixels.copy_(counts)

    def on_train_epoch_end(self) -> None:
        self._report_unlabelled("train", "training crops", "they add nothing to the loss")

    # --- evaluation -----------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], metrics: SegmentationMetrics, stage: str) -> list[Tensor]:
        masks = list(batch["mask"])
        labels = self.predict_labels(batch["image"], [m.shape[-2:] for m in masks])
        for predicted, mask in zip(labels, masks):
            metrics.update(predicted[None], mask[None])
            self.unlabelled[stage].update(int(not bool((mask != IGNORE_INDEX).any())))
        return labels

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        labels = self._evaluate(batch, self.val_metrics, "val")
        if batch_idx == 0:
            self.log_images(batch, labels)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    @property
    def baseline_class(self) -> int | None:
        """The training set's most frequent class (None before the training masks were counted)."""
        return int(self.train_class_pixels.argmax()) if int(self.train_class_pixels.sum()) > 0 else None

    def _log_metrics(self, metrics: SegmentationMetrics, stage: str) -> None:
        results = metrics.compute()  # summed over all processes
        prefix = f"{stage}_"
        self.log(f"{prefix}miou", results["miou"].float(), sync_dist=False)
        self.log(f"{prefix}pixel_acc", results["pixel_acc"].float(), sync_dist=False)
        iou = results["iou"].cpu()
        for label, value in enumerate(iou.tolist()):
            if not np.isnan(value):  # a class neither in the ground truth nor predicted has no IoU
                self.log(f"{prefix}iou/{_metric_name(label, self.class_names[label])}", float(value), sync_dist=False)
        if self.baseline_class is not None:
            baseline = trivial_baseline(results["confusion"].cpu(), self.baseline_class)
            self.log(f"{prefix}baseline_miou", baseline["miou"], sync_dist=False)
            self.log(f"{prefix}baseline_pixel_acc", baseline["pixel_acc"], sync_dist=False)
        self._log_table(stage, iou, results)
        self._report_unlabelled(stage, f"{'validation' if stage == 'val' else 'test'} images",
                                "they do not count in the metrics")
        metrics.reset()

    def _report_unlabelled(self, stage: str, what: str, consequence: str) -> None:
        metric = self.unlabelled[stage]
        count = int(metric.compute()) if metric.update_called else 0
        metric.reset()
        if count and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log.warning("%d %s had no labelled pixel (every mask value unlabelled or ignored); %s", count, what,
                        consequence)

    @rank_zero_only
    def _log_table(self, stage: str, iou: Tensor, results: dict[str, Tensor]) -> None:
        """The per-class IoU as a markdown table in TensorBoard's text tab."""
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        rows = ["| label | class | IoU |", "|---:|---|---:|"]
        rows += [f"| {label} | {name} | {'-' if np.isnan(v) else f'{v:.4f}'} |"
                 for label, (name, v) in enumerate(zip(self.class_names, iou.tolist()))]
        rows.append(f"| | **mIoU** | **{float(results['miou']):.4f}** |")
        self.logger.experiment.add_text(f"{stage}/per_class_iou", "\n".join(rows), self.global_step)

    @rank_zero_only
    def log_images(self, batch: dict[str, Any], labels: list[Tensor]) -> None:
        """Image, ground truth and prediction overlays of the first validation images to TensorBoard."""
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        for index in range(min(self.num_logged_images, len(labels))):
            mask = batch["mask"][index].cpu().numpy()
            image = read_image(batch["path"][index]) if tuple(mask.shape) != tuple(batch["image"][index].shape[-2:]) \
                else (batch["image"][index].float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            panels = {"image": image, "ground_truth": overlay(image, mask, self.num_classes),
                      "prediction": overlay(image, labels[index].cpu().numpy(), self.num_classes)}
            for name, picture in panels.items():
                self.logger.experiment.add_image(f"val/{index}/{name}", picture, self.global_step, dataformats="HWC")

    # --- prediction -----------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per image: name, path, and ``ids``: the predicted class of every pixel of the original image in
        the dataset's class ids (``category_ids``), uint8 or uint16."""
        labels = self.predict_labels(batch["image"], batch["size"])
        ids = np.asarray(self.category_ids)
        dtype = np.uint8 if ids.max(initial=0) < 256 else np.uint16
        return [{"name": name, "path": path, "labels": label.cpu().numpy().astype(np.int64),
                 "ids": ids[label.cpu().numpy()].astype(dtype)}
                for name, path, label in zip(batch["name"], batch["path"], labels)]

    # --- reporting ------------------------------------------------------------------------------------
    def summary_line(self) -> str | None:
        """Validation mIoU next to the trivial baseline's."""
        metrics = self.trainer.callback_metrics
        if "val_miou" not in metrics:
            return None
        miou = float(metrics["val_miou"])
        line = f"Validation mIoU {miou:.4f} (pixel accuracy {float(metrics['val_pixel_acc']):.4f})"
        if "val_baseline_miou" in metrics and self.baseline_class is not None:
            baseline = float(metrics["val_baseline_miou"])
            line += (f"; trivial baseline (every pixel '{self.class_names[self.baseline_class]}', the training set's "
                     f"most frequent class) mIoU {baseline:.4f}; ratio {miou / baseline:.2f}" if baseline > 0 else "")
        return line


class SegmentationPredictionWriter(LattnPredictionWriter):
    """Saves every prediction as ``<name>_labels.png`` and ``<name>_overlay.png`` under `output_dir`.

    ``<name>`` is the image's path relative to the data root (or to ``predict_dir``) without its suffix.
    The label PNG holds the dataset's own class ids (ADE20K: 1..150, Cityscapes: labelIds, a folder
    layout: the class indices of its class list), 8-bit (16-bit for ids above 255), at the original
    image's size; the overlay blends the class colours over the image. An existing file is never
    replaced unasked (:class:`~lattn_app.tasks.prediction_writer.LattnPredictionWriter`): a second
    ``lattn predict`` into the same folder stops at its first file, unless ``--overwrite true``.

    Args:
        output_dir: the folder; the command line names it ``predictions/<config name>``.
        alpha: opacity of the class colours in the overlay.
        overwrite: replace files an earlier run wrote.
    """

    def __init__(self, output_dir: str = "predictions", alpha: float = 0.5, overwrite: bool = False) -> None:
        super().__init__(output_dir, overwrite)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        self.alpha = alpha

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        num_classes = pl_module.num_classes
        for result in prediction:
            name, source = result["name"], str(result["path"])
            labels_path = self.target(f"{name}_labels.png", source)
            overlay_path = self.target(f"{name}_overlay.png", source)
            Image.fromarray(result["ids"]).save(labels_path)
            picture = overlay(read_image(result["path"]), result["labels"], num_classes, self.alpha)
            Image.fromarray(picture).save(overlay_path)

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"Predictions (label PNGs in the dataset's class ids, and colour overlays) written to "
                  f"{self.output_dir.resolve()}", flush=True)
