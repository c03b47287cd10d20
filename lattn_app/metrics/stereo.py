"""Stereo disparity metrics as torchmetrics ``Metric`` subclasses.

Averaging: every metric is a ratio of two sums over **all valid pixels of the whole set** (per pixel,
not per image): EPE = sum |d_pred - d_gt| / #valid, bad-k = #(|error| > k) / #valid, D1 =
#(|error| > 3 and |error| > 5% of d_gt) / #valid (the KITTI 2015 outlier rate). A pixel is valid when
0 < d_gt < max_disparity (the same pixels the loss trains on). The sums are ``dist_reduce_fx="sum"``
states in float64, so under DDP the ranks' sums add up and the result equals a single-process
evaluation of the same pixels. Rates are fractions (0.05 = 5%).

The benchmarks score every pixel with ground truth (``max_disparity=None``), on all pixels or on the
non-occluded ones only: :data:`BENCHMARK_METRICS` names them as the benchmarks do (``d1_all``: KITTI
2015's D1 on all pixels; ``bad2_noc``: Middlebury's bad-2.0 on non-occluded pixels; ``avgerr_noc``:
the average absolute error, ...), and :func:`benchmark_metric` builds one. :func:`zero_shot_table`
gathers the ``test_metrics.json`` of several ``lattn test`` runs into one table
(``python -m lattn_app.metrics.stereo lightning_logs/<run>/*/test_metrics.json``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection


def valid_disparity_mask(target: Tensor, max_disparity: float | None) -> Tensor:
    """Pixels with ground truth inside (0, max_disparity): the ones that are trained on and scored."""
    valid = torch.isfinite(target) & (target > 0)
    if max_disparity is not None:
        valid &= target < max_disparity
    return valid


class _DisparityRate(Metric):
    """sum(per-pixel score over valid pixels) / number of valid pixels."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, max_disparity: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_disparity = max_disparity
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def pixel_scores(self, error: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """preds and target: disparities of the same shape, (B, H, W) or (H, W); `mask` (bool, same
        shape): score only these pixels (e.g. the non-occluded ones)."""
        if preds.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: preds {tuple(preds.shape)} and target "
                             f"{tuple(target.shape)} must have the same shape")
        valid = valid_disparity_mask(target, self.max_disparity)
        if mask is not None:
            if mask.shape != target.shape:
                raise ValueError(f"{type(self).__name__}: mask {tuple(mask.shape)} and target {tuple(target.shape)} "
                                 "must have the same shape")
            valid &= mask.bool()
        error = (preds.detach()[valid].double() - target[valid].double()).abs()
        self.total += self.pixel_scores(error, target[valid].double()).sum()
        self.count += valid.sum()

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


class EndPointError(_DisparityRate):
    """Mean absolute disparity error in pixels (EPE) over all valid pixels of the set."""

    def pixel_scores(self, error: Tensor, target: Tensor) -> Tensor:
        return error


class BadPixelRate(_DisparityRate):
    """Fraction of valid pixels whose disparity error exceeds `threshold` pixels (bad-1, bad-2, bad-3)."""

    def __init__(self, threshold: float, max_disparity: float | None = None, **kwargs) -> None:
        super().__init__(max_disparity, **kwargs)
        self.threshold = threshold

    def pixel_scores(self, error: Tensor, target: Tensor) -> Tensor:
        return (error > self.threshold).double()


class D1Error(_DisparityRate):
    """KITTI 2015 D1: fraction of valid pixels with error > 3 px and > 5% of the true disparity."""

    def pixel_scores(self, error: Tensor, target: Tensor) -> Tensor:
        return ((error > 3) & (error > 0.05 * target)).double()


def stereo_metrics(max_disparity: float | None, prefix: str) -> MetricCollection:
    """EPE, bad-1/2/3 and D1 as one collection whose keys start with `prefix` (e.g. ``val_epe``)."""
    return MetricCollection(
        {
            "epe": EndPointError(max_disparity),
            "bad1": BadPixelRate(1.0, max_disparity),
            "bad2": BadPixelRate(2.0, max_disparity),
            "bad3": BadPixelRate(3.0, max_disparity),
            "d1": D1Error(max_disparity),
        },
        prefix=prefix,
    )


# ------------------------------------------------------------------------------------ the benchmarks' metrics

#: name -> (what, threshold, pixels): the benchmarks' own metrics, scored on every pixel with ground truth
#: ("all") or on the non-occluded ones ("noc"). KITTI 2015: d1_*; KITTI 2012: bad3_* (">3 px", Out-Noc /
#: Out-All) and avgerr_*; Middlebury: bad2_*, avgerr_*; ETH3D: bad1_noc, avgerr_noc.
BENCHMARK_METRICS: dict[str, tuple[str, float, str]] = {
    f"{name}_{pixels}": (kind, threshold, pixels)
    for name, kind, threshold in (("d1", "d1", 3.0), ("bad1", "bad", 1.0), ("bad2", "bad", 2.0), ("bad3", "bad", 3.0),
                                  ("avgerr", "avgerr", 0.0))
    for pixels in ("all", "noc")
}


def benchmark_metric(name: str) -> _DisparityRate:
    """The metric `name` of :data:`BENCHMARK_METRICS`, scoring every pixel with ground truth.

    Its ``pixels`` attribute says which pixels it scores ("all", or "noc": update it with the
    non-occluded mask). Raises ValueError naming the known metrics for an unknown name.
    """
    if name not in BENCHMARK_METRICS:
        raise ValueError(f"unknown stereo benchmark metric {name!r}; expected one of {', '.join(BENCHMARK_METRICS)}")
    kind, threshold, pixels = BENCHMARK_METRICS[name]
    metric: _DisparityRate
    if kind == "d1":
        metric = D1Error(None)
    elif kind == "bad":
        metric = BadPixelRate(threshold, None)
    else:
        metric = EndPointError(None)
    metric.pixels = pixels
    return metric


# ------------------------------------------------------------------------------------ the zero-shot table

#: columns of the zero-shot table: (heading, metric key in test_metrics.json, scale); rates are shown in %
TABLE_COLUMNS = (("EPE", "test_epe", 1.0), ("bad-1 %", "test_bad1", 100.0), ("bad-2 %", "test_bad2", 100.0),
                 ("bad-3 %", "test_bad3", 100.0), ("D1 %", "test_d1", 100.0))


def _benchmark_of(json_path: Path) -> str:
    """The benchmark a test_metrics.json belongs to: the data class in the config.yaml saved beside it."""
    config = json_path.parent / "config.yaml"
    if config.is_file():
        import yaml

        try:
            data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
        except yaml.YAMLError:
            data = {}
        name = str(data.get("class_path", "")).rsplit(".", 1)[-1].replace("DataModule", "")
        resolution = (data.get("init_args") or {}).get("resolution")
        if name:
            return f"{name} ({resolution})" if name == "Middlebury" and resolution else name
    return json_path.parent.name


def zero_shot_table(paths: Sequence[str | Path]) -> str:
    """One Markdown table of several ``lattn test`` runs' ``test_metrics.json`` (one row per file).

    Columns: the set (from the run's saved config.yaml, else its folder name), EPE and bad-1/2/3 and D1
    of the model, the benchmark's own metrics (``test_<name>`` of :data:`BENCHMARK_METRICS`), the SGBM
    baseline's EPE and bad-2, and the evaluation scale (< 1 where the set's disparities exceed the
    model's range).

    Raises:
        FileNotFoundError / ValueError: a file is missing or is not a test_metrics.json (named).
    """
    rows, benchmark_keys = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"zero-shot table: {path} not found; expected the test_metrics.json of a lattn test run")
        try:
            record = json.loads(path.read_text())
            metrics = record["metrics"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"zero-shot table: {path} is not a lattn test_metrics.json ({error})") from None
        rows.append((_benchmark_of(path), metrics))
        benchmark_keys += [f"test_{name}" for name in BENCHMARK_METRICS
                           if f"test_{name}" in metrics and f"test_{name}" not in benchmark_keys]
    columns = [*TABLE_COLUMNS, *((key[5:], key, 100.0 if not key.startswith("test_avgerr") else 1.0)
                                 for key in benchmark_keys),
               ("SGBM EPE", "test_sgbm_epe", 1.0), ("SGBM bad-2 %", "test_sgbm_bad2", 100.0),
               ("scale", "test_eval_scale_min", 1.0)]
    lines = ["| set | " + " | ".join(heading for heading, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, metrics in rows:
        cells = [f"{metrics[key] * scale:.2f}" if key in metrics else "-" for _, key, scale in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m lattn_app.metrics.stereo lightning_logs/<run>/*/test_metrics.json
    if len(sys.argv) < 2:
        sys.exit("usage: python -m lattn_app.metrics.stereo TEST_METRICS_JSON [...]: one table of lattn test runs")
    try:
        print(zero_shot_table(sys.argv[1:]))
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
