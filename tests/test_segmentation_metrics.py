"""Segmentation metrics: mIoU, per-class IoU and pixel accuracy from the accumulated confusion matrix equal
numpy's per-class intersection / union counts over a whole split (several batches, ignored pixels, a class
that never occurs), and the trivial baseline equals scoring the constant prediction itself."""

from __future__ import annotations

import numpy as np
import torch

from lattn_app.metrics.segmentation import SegmentationMetrics, trivial_baseline


def numpy_scores(truths: list[np.ndarray], predictions: list[np.ndarray], num_classes: int, ignore: int):
    intersection, union = np.zeros(num_classes), np.zeros(num_classes)
    correct = labelled = 0
    for truth, predicted in zip(truths, predictions):
        keep = truth != ignore
        correct += (truth[keep] == predicted[keep]).sum()
        labelled += keep.sum()
        for k in range(num_classes):
            t, p = (truth == k) & keep, (predicted == k) & keep
            intersection[k] += (t & p).sum()
            union[k] += (t | p).sum()
    iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    return np.nanmean(iou), iou, correct / labelled


def test_scores_over_a_split_equal_numpy_counts():
    rng = np.random.default_rng(0)
    num_classes, ignore = 6, 255
    truths, predictions = [], []
    metric = SegmentationMetrics(num_classes, ignore)
    for batch in range(5):  # batches of different sizes, as an evaluation loader gives them
        size = (int(rng.integers(1, 4)), int(rng.integers(5, 30)), int(rng.integers(5, 30)))
        truth = rng.integers(0, num_classes - 1, size)  # class 5 never occurs in the ground truth...
        truth[rng.random(size) < 0.2] = ignore
        predicted = np.where(rng.random(size) < 0.6, truth, rng.integers(0, num_classes - 2, size))  # ...nor predicted
        predicted[predicted == ignore] = 0
        metric.update(torch.from_numpy(predicted), torch.from_numpy(truth))
        truths += list(truth)
        predictions += list(predicted)
    results = metric.compute()
    miou, iou, pixel_acc = numpy_scores(truths, predictions, num_classes, ignore)
    assert np.isnan(iou[5]) and np.isnan(results["iou"][5].item())
    np.testing.assert_allclose(results["iou"].numpy(), iou, atol=1e-12)
    assert abs(results["miou"].item() - miou) < 1e-6 and abs(results["pixel_acc"].item() - pixel_acc) < 1e-6


def test_the_trivial_baseline_is_the_score_of_the_constant_prediction():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (3, 20, 20))
    truth[:, :5] = 255
    metric = SegmentationMetrics(5, 255)
    metric.update(torch.from_numpy(rng.integers(0, 5, truth.shape)), torch.from_numpy(truth))
    baseline = trivial_baseline(metric.compute()["confusion"], predicted_class=2)
    constant = SegmentationMetrics(5, 255)
    constant.update(torch.full(truth.shape, 2), torch.from_numpy(truth))
    scored = constant.compute()
    assert abs(baseline["miou"] - scored["miou"].item()) < 1e-12
    assert abs(baseline["pixel_acc"] - scored["pixel_acc"].item()) < 1e-12
    assert abs(baseline["pixel_acc"] - (truth == 2).sum() / (truth != 255).sum()) < 1e-12
