"""Semantic segmentation metrics over a whole split: mIoU, per-class IoU and pixel accuracy.

:class:`SegmentationMetrics` is torchmetrics' ``MulticlassConfusionMatrix`` (pixels with the ignore
index are left out); its state is the K x K pixel count matrix (rows: ground truth, columns:
prediction), summed over every batch and, under DDP, over every process, so the scores are those of the
whole split, each pixel counted once. From it:

- IoU of class k = TP_k / (TP_k + FP_k + FN_k) = C[k, k] / (row_k + column_k - C[k, k]); a class that is
  neither in the ground truth nor predicted has no IoU (NaN) and is left out of the mean;
- mIoU = the mean IoU over the classes that have one (mmsegmentation's convention);
- pixel accuracy = trace(C) / sum(C), over the labelled pixels.

:func:`trivial_baseline` scores the predictor that outputs one class everywhere (the training set's
most frequent class) from the same matrix, without running it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

__all__ = ["SegmentationMetrics", "iou_from_confusion", "trivial_baseline"]


def iou_from_confusion(confusion: Tensor) -> Tensor:
    """Per-class IoU (K,) from a K x K confusion matrix (rows: truth); NaN where a class has no pixel at all."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))


def trivial_baseline(confusion: Tensor, predicted_class: int) -> dict[str, float]:
    """mIoU and pixel accuracy of predicting `predicted_class` for every pixel, on the split of `confusion`.

    Only the ground-truth counts (the rows' sums) matter: that predictor's confusion matrix has them all
    in the `predicted_class` column.
    """
    truth = confusion.double().sum(dim=1)
    constant = torch.zeros_like(confusion, dtype=torch.float64)
    constant[:, predicted_class] = truth
    iou = iou_from_confusion(constant)
    total = float(truth.sum())
    return {"miou": float(iou.nanmean()) if total else float("nan"),
            "pixel_acc": float(truth[predicted_class]) / total if total else float("nan")}


class SegmentationMetrics(MulticlassConfusionMatrix):
    """The pixel confusion matrix of a split; :meth:`compute` gives mIoU, per-class IoU and pixel accuracy.

    Args:
        num_classes: classes K (labels 0 .. K-1).
        ignore_index: the label of unlabelled pixels, left out of every count.

    ``update(preds, target)`` takes predicted labels and ground truth of the same shape (B, H, W);
    ``compute()`` returns ``{"miou", "pixel_acc", "iou" (K,), "confusion" (K, K)}``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        # validate_args=False: the check scans every pixel for out-of-range labels; the datasets check
        # their masks against the class list when they read them.
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        confusion = self.confmat
        iou = iou_from_confusion(confusion)
        total = confusion.sum()
        pixel_acc = confusion.diagonal().sum().double() / total if total > 0 else torch.tensor(float("nan"))
        return {"miou": iou.nanmean(), "pixel_acc": pixel_acc, "iou": iou, "confusion": confusion}
