"""StereoTask: disparity estimation on Scene Flow-format data with the attention stereo network or PSMNet.

``network: attention`` (the default) trains lattn's attention stereo network
(:mod:`lattn_app.models.stereo`); ``network: psmnet`` trains PSMNet's own stacked-hourglass network, and
with ``psmnet_attention: efficient`` the Efficient Attention paper's EA-PSMNet (:mod:`lattn_app.models.psmnet`).

Training minimises PSMNet's multi-output smooth-L1 loss over valid pixels (0 < ground truth <
max_disparity), one term per hourglass output weighted by ``loss_weights``. Validation and test report
EPE, bad-1/2/3 and D1 (lattn_app.metrics.stereo, averaged per pixel over the whole split) and, for
reference, ``*_baseline_epe``: the EPE of the trivial predictor that outputs each image's mean true
disparity everywhere. TensorBoard gets the left image, ground truth, prediction and error map of the
first validation batch every validation run. ``predict`` returns each disparity map with its name;
:class:`StereoPredictionWriter` saves it as PFM, 16-bit PNG and a colour-mapped PNG, and, for pairs with
a calibration, as metric depth (PFM) and a coloured point cloud (PLY).

On the real benchmarks (KITTI, Middlebury, ETH3D: datamodules with ``score_all_ground_truth``) every
pixel with ground truth is scored, as the benchmarks do, and ``lattn test`` adds the benchmark's own
metrics (``test_d1_all``, ``test_bad2_noc``, ... of :data:`~lattn_app.metrics.stereo.BENCHMARK_METRICS`)
and OpenCV's SGBM on the same pairs (``test_sgbm_*``: the classical baseline).

Pairs whose disparities may exceed ``max_disparity`` (their ``disparity_bound``: calib.txt's ``ndisp``
or ``--data.disparity_bound``) are evaluated and predicted at the reduced scale that fits them into the
model's range, the prediction upsampled and its disparities scaled back up; the log says so and the
metrics JSON records ``*_eval_scale_min`` (1.0: no pair was reduced) and ``*_rescaled_pairs``. Where
no bound is known and ground truth lies beyond the range, ``*_gt_beyond_range_pixels`` counts it and
the log names the option to set. Pairs of different sizes are taken one by one; a pair smaller than
the network can match (:attr:`~lattn_app.models.stereo.StereoNet.size_multiple` in each direction) is
refused, naming the file and the minimum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor, nn

from ..data.io import (
    colorize_disparity,
    write_disparity_png16,
    write_pfm,
    write_ply_points,
)
from ..data.stereo.calibration import StereoCalibration, depth_from_disparity
from ..data.stereo.dataset import split_batch
from ..metrics.stereo import (
    BENCHMARK_METRICS,
    EndPointError,
    benchmark_metric,
    stereo_metrics,
    valid_disparity_mask,
)
from ..models.psmnet import PSMNet
from ..models.stereo import StereoNet, StereoNetOptions, check_max_disparity
from ..registry import check_choice
from .base import LattnTask
from .prediction_writer import LattnPredictionWriter
from .record import checkpoint_mismatch, read_checkpoint_header

log = logging.getLogger(__name__)

PSMNET_LOSS_WEIGHTS = (0.5, 0.7, 1.0)
DEFAULT_MAX_DISPARITY = 192  # PSMNet's range on Scene Flow
NETWORKS = ("attention", "psmnet")  # StereoNet (lattn's attention stereo network), PSMNet / EA-PSMNet


class StereoTask(LattnTask):
    """Stereo matching: PSMNet with registry backbone and attention over 1/4-resolution features, or PSMNet's own network.

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
        classical_baseline: ``lattn test`` also scores OpenCV's SGBM on the same pairs (``test_sgbm_*``).
        init_checkpoint: fine-tuning: a lattn stereo checkpoint (e.g. Scene Flow's best.ckpt) whose weights
            the model starts from when a ``fit`` begins (not when it resumes with ``--ckpt_path``); it must
            have this config's architecture. None: random initialisation.
        network: ``attention`` (default): the attention stereo network above
            (:class:`~lattn_app.models.stereo.StereoNet`). ``psmnet``: PSMNet's own stacked-hourglass
            network (:class:`~lattn_app.models.psmnet.PSMNet`, 5.22M parameters), which does not read
            `backbone`, `backbone_options`, `attention`, `attention_options` or `net` (but its
            ``img_size``).
        psmnet_attention: with ``network: psmnet``: None (default): PSMNet; a registered mechanism
            (``efficient``: the Efficient Attention paper's EA-PSMNet; ``softmax``: a non-local module)
            adds one attention module after the feature extractor's last residual layer.
        psmnet_attention_options: that mechanism's own options.
        psmnet_attention_heads: heads of that module (1: the paper's module).
        **kwargs: the training options of :class:`~lattn_app.tasks.base.LattnTask` (``lr``,
            ``lr_milestones``: PSMNet's KITTI recipe drops the rate tenfold at epoch 200 of 300, ...).
    """

    compiled_part = "net"

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
        classical_baseline: bool = True,
        init_checkpoint: str | None = None,
        network: str = "attention",
        psmnet_attention: str | None = None,
        psmnet_attention_options: dict[str, Any] | None = None,
        psmnet_attention_heads: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("model.network", network, NETWORKS)
        net = StereoNetOptions.of(net)
        self.save_hyperparameters()
        self.hparams["net"] = asdict(net)  # checkpoints hold plain values (they load with weights_only=True)
        if network == "psmnet":
            unread = [f"net.{key}" for key, value in asdict(net).items()
                      if key != "img_size" and value != getattr(StereoNetOptions(), key)]
            if unread:  # a warning, not an error: one command line may serve both networks' configs
                log.warning("network psmnet does not read %s (options of network 'attention'); PSMNet's "
                            "architecture is fixed", ", ".join(unread))
        elif psmnet_attention is not None or psmnet_attention_options:
            raise ValueError(f"model.psmnet_attention is {psmnet_attention!r} but model.network is {network!r}; "
                             "expected network: psmnet (or psmnet_attention: null)")
        self.network = network
        num_hourglasses = PSMNet.num_outputs if network == "psmnet" else net.num_hourglasses
        if loss_weights is None:
            loss_weights = PSMNET_LOSS_WEIGHTS[-num_hourglasses:] if num_hourglasses <= 3 else [1.0] * num_hourglasses
        if len(loss_weights) != num_hourglasses:
            raise ValueError(f"loss_weights needs one weight per hourglass ({num_hourglasses}); got {list(loss_weights)}")
        self.loss_weights = list(loss_weights)
        self.num_logged_images = num_logged_images
        # Built at PSMNet's range when max_disparity is unset: no weight depends on it (set_max_disparity).
        if network == "psmnet":
            self.net = PSMNet(max_disparity or DEFAULT_MAX_DISPARITY, psmnet_attention, psmnet_attention_options,
                              psmnet_attention_heads, tuple(net.img_size))
            self.backbone = self.net.feature_extraction  # what freeze_backbone freezes
        else:
            self.net = StereoNet(max_disparity or DEFAULT_MAX_DISPARITY, backbone, backbone_options, attention,
                                 attention_options, net)
            self.backbone = self.net.backbone
        self.val_metrics = stereo_metrics(None, "val_")
        self.test_metrics = stereo_metrics(None, "test_")
        self.val_baseline = EndPointError()
        self.test_baseline = EndPointError()
        # The benchmarks' own metrics and the SGBM baseline (test only; the datamodule says which are reported).
        self.test_benchmark = nn.ModuleDict({name: benchmark_metric(name) for name in BENCHMARK_METRICS})
        self.test_sgbm = stereo_metrics(None, "test_sgbm_")
        self.test_sgbm_benchmark = nn.ModuleDict({name: benchmark_metric(name) for name in BENCHMARK_METRICS})
        self.classical_baseline = classical_baseline
        self.init_checkpoint = init_checkpoint
        self.score_all_ground_truth = False  # set from the datamodule when evaluation starts
        self.reported_benchmark_metrics: tuple[str, ...] = ()
        self._announced: set[tuple[str, float]] = set()
        self._predict_saturation = [0, 0]  # predicted pixels at the range's end, all predicted pixels
        self.max_disparity: int | None = None
        if max_disparity is not None:
            self.set_max_disparity(max_disparity)

    def set_max_disparity(self, max_disparity: int) -> None:
        """Use `max_disparity` for the cost volume, the loss and the metrics, and record it as a hyperparameter."""
        check_max_disparity(max_disparity)
        self.max_disparity = max_disparity
        self.net.max_disparity = max_disparity
        self.hparams["max_disparity"] = max_disparity
        self._configure_scoring()

    def _configure_scoring(self) -> None:
        """Score pixels inside the model's range (Scene Flow) or every pixel with ground truth (the benchmarks)."""
        limit = None if self.score_all_ground_truth else self.max_disparity
        for metric in (*self.val_metrics.values(), *self.test_metrics.values(), self.val_baseline, self.test_baseline,
                       *self.test_sgbm.values()):
            metric.max_disparity = limit

    @property
    def scoring_limit(self) -> int | None:
        return None if self.score_all_ground_truth else self.max_disparity

    def _read_evaluation_data(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.score_all_ground_truth = bool(getattr(datamodule, "score_all_ground_truth", False))
        names = tuple(getattr(datamodule, "benchmark_metrics", ()) or ())
        unknown = [name for name in names if name not in BENCHMARK_METRICS]
        if unknown:
            raise ValueError(f"{type(datamodule).__name__}.benchmark_metrics names unknown metrics {unknown}; expected "
                             f"names of {', '.join(BENCHMARK_METRICS)}")
        self.reported_benchmark_metrics = names
        self.benchmark_name = getattr(datamodule, "benchmark_name", None) or type(datamodule).__name__
        self._configure_scoring()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._read_evaluation_data()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._read_evaluation_data()

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._predict_saturation = [0, 0]

    # --- fine-tuning --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # After Lightning has restored a --ckpt_path checkpoint (which calls on_load_checkpoint), before training.
        super().on_fit_start()
        if self.init_checkpoint:
            if getattr(self, "_weights_from_checkpoint", False):
                log.info("The weights come from a checkpoint (resumed or loaded): model.init_checkpoint %s is not "
                         "loaded", self.init_checkpoint)
            else:
                self.load_initial_weights(self.init_checkpoint)

    def load_initial_weights(self, path: str | Path) -> None:
        """Start from the weights of the lattn stereo checkpoint `path` (one-line errors name the file)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.init_checkpoint: {path} not found; expected a lattn stereo checkpoint to "
                                    "start from (e.g. checkpoints/sceneflow_efficient/best.ckpt after lattn fit --config "
                                    "configs/sceneflow_efficient.yaml), or null to start from random weights")
        header = read_checkpoint_header(path)
        if "state_dict" not in header:
            raise ValueError(f"model.init_checkpoint: {path} holds no state_dict; expected a lattn stereo checkpoint")
        problem = checkpoint_mismatch(header, type(self), self.hparams, self.state_dict())
        if problem is not None:
            raise ValueError(f"model.init_checkpoint: {path}: {problem}")
        self.load_state_dict(header["state_dict"])
        trained = (header.get("hyper_parameters") or {}).get("max_disparity")
        log.info("Fine-tuning from %s (trained with max_disparity %s; this run uses %s)", path, trained,
                 self.max_disparity)

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
        self._weights_from_checkpoint = True  # trained weights: init_checkpoint must not replace them
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

    # --- evaluation and prediction ------------------------------------------------------------------
    def _parts(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """The batch as sub-batches of one size and one evaluation scale (usually the batch itself)."""
        if isinstance(batch["left"], list):  # pairs of several sizes (stereo_collate): one by one
            return split_batch(batch)
        bounds = batch.get("disparity_bound")
        if bounds is not None and len({self.fitting_scale(float(b)) for b in bounds}) > 1:
            return split_batch(batch)
        return [batch]

    def fitting_scale(self, bound: float | None) -> float:
        """The scale (<= 1) at which disparities up to `bound` fit the model's range; 1 when they do."""
        if bound is None or not math.isfinite(bound) or bound <= self.max_disparity:
            return 1.0
        return self.max_disparity / bound

    def _announce(self, stage: str, message: str, *args: Any) -> None:
        key = (stage, message % args)
        if key not in self._announced and (self._trainer is None or self.trainer.is_global_zero):
            self._announced.add(key)
            log.warning(message, *args)

    def predict_pair(self, part: dict[str, Any], stage: str) -> tuple[Tensor, float]:
        """Final disparity (B, H, W) of one sub-batch at full size, and the scale it was computed at.

        A pair whose ``disparity_bound`` exceeds ``max_disparity`` is downsampled to fit, predicted, and
        its disparity upsampled and multiplied back. Pairs smaller than the network can match are refused.
        """
        left, right = part["left"], part["right"]
        height, width = left.shape[-2:]
        bounds = part.get("disparity_bound")
        bound = float(bounds.max()) if bounds is not None else None
        scale = self.fitting_scale(bound)
        new_width = max(1, math.floor(width * scale)) if scale < 1 else width
        new_height = max(1, round(height * new_width / width)) if scale < 1 else height
        minimum = self.net.size_multiple
        if new_height < minimum or new_width < minimum:
            where = "" if scale == 1 else f" at the scale {scale:.3f} that fits its disparities ({new_width}x{new_height})"
            raise ValueError(f"{part['name'][0]}: the stereo pair is {width}x{height} pixels{where}, smaller than the "
                             f"network can match; the minimum is {minimum}x{minimum} (width x height)")
        if scale == 1:
            return self(left, right), 1.0
        self._announce(stage, "%s: pairs with disparities up to %g px exceed the model's max_disparity %d; they are "
                       "evaluated at scale %.3f (e.g. %dx%d -> %dx%d) and the disparities scaled back up",
                       getattr(self, "benchmark_name", "stereo"), bound, self.max_disparity, new_width / width,
                       width, height, new_width, new_height)
        small = [F.interpolate(view, size=(new_height, new_width), mode="bilinear", align_corners=False,
                               antialias=True) for view in (left, right)]
        disparity = self(*small)
        full = F.interpolate(disparity.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
        return full.squeeze(1) * (width / new_width), new_width / width

    def _evaluate(self, batch: dict[str, Any], stage: str) -> list[tuple[dict[str, Any], Tensor]]:
        metrics, baseline = (self.val_metrics, self.val_baseline) if stage == "val" else (self.test_metrics,
                                                                                           self.test_baseline)
        results, scales, beyond = [], [], 0
        for part in self._parts(batch):
            prediction, scale = self.predict_pair(part, stage)
            target = part["disparity"]
            metrics.update(prediction, target)
            baseline.update(mean_disparity_baseline(target, self.scoring_limit), target)
            if self.score_all_ground_truth:  # ground truth the model cannot reach at this scale
                beyond += int(((target * scale >= self.max_disparity) & (target > 0)).sum())
            if stage == "test":
                self._score_benchmark(part, prediction, self.test_benchmark)
                if self.classical_baseline:
                    sgbm = sgbm_disparity(part["left"], part["right"], part.get("disparity_bound"), self.max_disparity)
                    self.test_sgbm.update(sgbm, target)
                    self._score_benchmark(part, sgbm, self.test_sgbm_benchmark)
            scales += [scale] * target.shape[0]
            results.append((part, prediction))
        size = len(scales)
        self.log(f"{stage}_eval_scale_min", min(scales), reduce_fx="min", sync_dist=True, batch_size=size)
        self.log(f"{stage}_rescaled_pairs", float(sum(scale < 1 for scale in scales)), reduce_fx="sum",
                 sync_dist=True, batch_size=size)
        if self.score_all_ground_truth:
            self.log(f"{stage}_gt_beyond_range_pixels", float(beyond), reduce_fx="sum", sync_dist=True, batch_size=size)
        return results

    def _score_benchmark(self, part: dict[str, Any], prediction: Tensor, collection: nn.ModuleDict) -> None:
        for name in self.reported_benchmark_metrics:
            metric = collection[name]
            if metric.pixels == "noc":
                if "nonoccluded" not in part:
                    continue
                metric.update(prediction, part["disparity"], part["nonoccluded"])
            else:
                metric.update(prediction, part["disparity"])

    def _log_benchmark(self, has_nonoccluded: bool) -> None:
        for name in self.reported_benchmark_metrics:
            if self.test_benchmark[name].pixels == "noc" and not has_nonoccluded:
                continue
            self.log(f"test_{name}", self.test_benchmark[name])
            if self.classical_baseline:
                self.log(f"test_sgbm_{name}", self.test_sgbm_benchmark[name])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        results = self._evaluate(batch, "val")
        self.log_dict(self.val_metrics)
        self.log("val_baseline_epe", self.val_baseline)
        if batch_idx == 0:
            self.log_images(*results[0])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")
        self.log_dict(self.test_metrics)
        self.log("test_baseline_epe", self.test_baseline)
        if self.classical_baseline:
            self.log_dict(self.test_sgbm)
        self._log_benchmark("nonoccluded" in batch)

    def _warn_beyond_range(self, stage: str) -> None:
        beyond = self.trainer.callback_metrics.get(f"{stage}_gt_beyond_range_pixels")
        if beyond is not None and float(beyond) > 0 and self.trainer.is_global_zero:
            log.warning("%s: %d ground-truth pixels lie beyond the model's max_disparity %d (at the evaluation scale); "
                        "they are scored, as the benchmark does, but the model cannot reach them. Pass "
                        "--data.disparity_bound D (the largest disparity of the set) to evaluate at a scale that "
                        "fits them", getattr(self, "benchmark_name", "stereo"), int(float(beyond)), self.max_disparity)

    def on_validation_end(self) -> None:
        self._warn_beyond_range("val")

    def on_test_end(self) -> None:
        self._warn_beyond_range("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per pair: its name, disparity (H, W) at full size, the scale it was computed at, and its calibration."""
        out: dict[str, list] = {"name": [], "disparity": [], "scale": [], "calibration": []}
        for part in self._parts(batch):
            disparity, scale = self.predict_pair(part, "predict")
            if scale == 1.0 and "disparity_bound" not in part:  # range unknown: watch for disparities cut at its end
                self._predict_saturation[0] += int((disparity >= self.max_disparity - 1.5).sum())
                self._predict_saturation[1] += disparity.numel()
            calibration = part.get("calibration")
            for index in range(disparity.shape[0]):
                out["name"].append(part["name"][index])
                out["disparity"].append(disparity[index].float().cpu())
                out["scale"].append(scale)
                out["calibration"].append(None if calibration is None else
                                          {key: float(value[index]) for key, value in calibration.items()})
        return out

    def on_predict_end(self) -> None:
        cut, total = self._predict_saturation
        if total and cut / total > 0.01 and self.trainer.is_global_zero:
            log.warning("%.1f%% of the predicted pixels are at the end of the model's range (max_disparity %d): the "
                        "pairs may hold larger disparities, which are cut there. Pass --data.disparity_bound D (the "
                        "largest disparity of the pairs) to predict at a reduced scale that fits them",
                        100 * cut / total, self.max_disparity)

    def summary_line(self) -> str | None:
        """Validation EPE next to the trivial baseline's."""
        metrics = self.trainer.callback_metrics
        if "val_epe" not in metrics or "val_baseline_epe" not in metrics:
            return None
        epe, baseline = float(metrics["val_epe"]), float(metrics["val_baseline_epe"])
        return (f"Validation EPE {epe:.3f} px; trivial baseline (each image's mean disparity) {baseline:.3f} px; "
                + (f"ratio {epe / baseline:.3f}" if baseline > 0 else "ratio n/a (the baseline is exact)"))

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


def fill_invalid_disparities(disparity: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fill invalid pixels row by row with the smaller of the nearest valid values left and right of them.

    KITTI's development kit fills the holes of sparse methods this way ("background interpolation"),
    so that a method is scored on every pixel; rows without a valid pixel become 0.
    """
    height, width = disparity.shape
    columns = np.arange(width)[None, :].repeat(height, 0)
    left_index = np.maximum.accumulate(np.where(valid, columns, -1), axis=1)
    right_index = np.flip(np.minimum.accumulate(np.flip(np.where(valid, columns, width), 1), axis=1), 1)
    rows = np.arange(height)[:, None]
    inf = np.float32(np.inf)
    from_left = np.where(left_index >= 0, disparity[rows, np.clip(left_index, 0, width - 1)], inf)
    from_right = np.where(right_index < width, disparity[rows, np.clip(right_index, 0, width - 1)], inf)
    filled = np.where(valid, disparity, np.minimum(from_left, from_right))
    return np.where(np.isfinite(filled), filled, 0).astype(np.float32)


def sgbm_disparity(left: Tensor, right: Tensor, bounds: Tensor | None, max_disparity: int,
                   block_size: int = 5) -> Tensor:
    """OpenCV's semi-global block matching (Hirschmüller 2008) on views in [0, 1] (B, 3, H, W) -> (B, H, W).

    The classical baseline beside every stereo result: OpenCV's StereoSGBM (3-way, `block_size`, the
    smoothness penalties P1 = 8 * 3 * block_size^2 and P2 = 32 * 3 * block_size^2 that its documentation
    suggests, uniqueness 10 %, speckle filtering), searching 0 .. the pair's disparity bound (or
    `max_disparity`) rounded up to a multiple of 16 (and kept below the image width); invalid pixels are
    filled as KITTI's development kit does (:func:`fill_invalid_disparities`).
    """
    import cv2

    results = []
    for index in range(left.shape[0]):
        bound = float(bounds[index]) if bounds is not None else float(max_disparity)
        width = left.shape[-1]
        # OpenCV needs the search range (a multiple of 16) to stay below the width.
        num_disparities = int(min(max(16, math.ceil(bound / 16) * 16), ((width - block_size) // 16) * 16))
        if num_disparities < 16:  # too narrow for SGBM to search at all: it predicts nothing (0)
            results.append(torch.zeros(left.shape[-2:]))
            continue
        views = [np.ascontiguousarray((view[index].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255)
                                      .round().astype(np.uint8)) for view in (left, right)]
        matcher = cv2.StereoSGBM_create(minDisparity=0, numDisparities=num_disparities, blockSize=block_size,
                                        P1=8 * 3 * block_size ** 2, P2=32 * 3 * block_size ** 2, disp12MaxDiff=1,
                                        uniquenessRatio=10, speckleWindowSize=100, speckleRange=2,
                                        preFilterCap=63, mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY)
        raw = matcher.compute(views[0], views[1]).astype(np.float32) / 16.0
        results.append(torch.from_numpy(fill_invalid_disparities(raw, raw > 0)))
    return torch.stack(results).to(left.device)


def _left_colours(batch: dict[str, Any], name: str) -> np.ndarray | None:
    """The left view (H, W, 3) uint8 of the prediction sample `name` in `batch`."""
    names = list(batch["name"])
    if name not in names:
        return None
    view = batch["left"][names.index(name)]
    view = view.reshape(-1, *view.shape[-3:])[0]
    return (view.float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def point_cloud(disparity: np.ndarray, calibration: StereoCalibration,
                colours: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(points (N, 3), colours (N, 3) or None, depth (H, W)) of the pixels with a finite depth.

    X = (u - cx) Z / f, Y = (v - cy) Z / f, Z = f B / (d + doffs); cx, cy default to the image centre.
    """
    depth = depth_from_disparity(disparity, calibration)
    height, width = depth.shape
    cx = (width - 1) / 2 if calibration.cx is None else calibration.cx
    cy = (height - 1) / 2 if calibration.cy is None else calibration.cy
    v, u = np.nonzero(np.isfinite(depth))
    z = depth[v, u].astype(np.float64)
    points = np.stack([(u - cx) * z / calibration.focal_length, (v - cy) * z / calibration.focal_length, z], axis=1)
    return points, None if colours is None else colours[v, u], depth


class StereoPredictionWriter(LattnPredictionWriter):
    """Saves every predicted disparity as ``<name>.pfm``, ``<name>_disp16.png`` and ``<name>_color.png``.

    ``<name>`` is the left image's path relative to the data root (or its file name for pairs given
    directly) without its extension, under `output_dir`. The 16-bit PNG stores round(256 * disparity)
    (the KITTI convention); the colour map spans 0 .. the model's max_disparity.

    Pairs with a calibration (the dataset's calib.txt / KITTI calibration files, or ``--data.focal_length``
    and ``--data.baseline``) also get ``<name>_depth.pfm`` (metric depth in the baseline's unit; inf where
    there is none) and ``<name>.ply`` (a binary PLY point cloud coloured by the left view, which Open3D,
    MeshLab and CloudCompare read).

    No file is replaced unasked (:class:`~lattn_app.tasks.prediction_writer.LattnPredictionWriter`): neither
    one an earlier run wrote (unless ``--overwrite true``) nor one of this run (two pairs whose names differ
    only in the extension).

    Args:
        output_dir: the folder written to.
        kitti_submission: also write ``<output_dir>/disp_0/<left image's file name>``, the KITTI benchmark's
            submission format (16-bit PNG, disparity * 256, at least 1/256: 0 would mean no prediction).
        overwrite: replace files an earlier run wrote.
    """

    def __init__(self, output_dir: str = "predictions", kitti_submission: bool = False,
                 overwrite: bool = False) -> None:
        super().__init__(output_dir, overwrite)
        self.kitti_submission = kitti_submission

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        max_disparity = getattr(pl_module, "max_disparity", None)  # the model's range (its checkpoint's)
        calibrations = prediction.get("calibration") or [None] * len(prediction["name"])
        for name, disparity, calibration in zip(prediction["name"], prediction["disparity"], calibrations):
            stem = Path(name).with_suffix("").as_posix()
            array = disparity.numpy()
            write_pfm(self.target(stem + ".pfm", name), array)
            write_disparity_png16(self.target(stem + "_disp16.png", name), array)
            Image.fromarray(colorize_disparity(array, max_disparity)).save(self.target(stem + "_color.png", name))
            if self.kitti_submission:
                write_disparity_png16(self.target(Path("disp_0") / Path(name).name, name), np.maximum(array, 1 / 256))
            if calibration is not None:
                values = dict(calibration)
                for key in ("cx", "cy"):
                    values[key] = None if not math.isfinite(values[key]) else values[key]
                calib = StereoCalibration(values["focal_length"], values["baseline"], values["doffs"], values["cx"],
                                          values["cy"])
                points, colours, depth = point_cloud(array, calib, _left_colours(batch, name))
                write_pfm(self.target(stem + "_depth.pfm", name), depth)
                write_ply_points(self.target(stem + ".ply", name), points, colours,
                                 comment=f"lattn stereo: {name}; depth = f * baseline / (disparity + doffs), "
                                         f"f {calib.focal_length:g} px, baseline {calib.baseline:g}, doffs {calib.doffs:g}")

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"Predictions written to {self.output_dir.resolve()}", flush=True)
