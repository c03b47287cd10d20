"""DetectionTask: object detection and instance segmentation (COCO format) on registry backbones.

The detector is torchvision's Mask R-CNN (default), Faster R-CNN, RetinaNet or FCOS around a registry
backbone with an FPN or ViTDet's simple feature pyramid (:mod:`lattn_app.models.detection`).
Images arrive resized by the datamodule (the one place that resizes) and are normalised here (the one
place that normalises, :meth:`LattnTask.normalize`).

Evaluation follows COCO: predictions are mapped back to each image's original size (boxes scaled,
mask probabilities resized and thresholded at 0.5) and scored against the original-size ground truth by
torchmetrics' ``MeanAveragePrecision`` (its pycocotools backend, so the numbers are COCOeval's): AP, AP50,
AP75, AP small/medium/large and AR@100, for boxes (``val_bbox_map`` ...) and, with Mask R-CNN, masks
(``val_segm_map`` ...). ``predict`` returns per image its boxes, scores, labels, original COCO category
ids and RLE masks; :class:`DetectionPredictionWriter` saves them as COCO results JSON (accepted by
pycocotools' ``loadRes``) and draws them on the images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from itertools import zip_longest
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.io import read_image
from ..models.detection import DetectorOptions, build_detector
from .base import LattnTask, backbone_options_with_attention
from .prediction_writer import LattnPredictionWriter

# The summary numbers of MeanAveragePrecision that are logged (per IoU type).
LOGGED_AP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
MASK_THRESHOLD = 0.5


_MISSING = object()  # fills the shorter shares when interleaving


class GatheredMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' MeanAveragePrecision whose per-image states are gathered whole across DDP processes.

    torchmetrics gathers list states one tensor at a time, which needs the same number of images on every
    process; lattn's evaluation loaders give each process every world-size-th image (no image counted
    twice), so the shares can differ by one. The states are gathered as Python objects instead and put
    back in dataset order (process r holds images r, r + world, r + 2 world, ...).
    """

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        world = torch.distributed.get_world_size(process_group)
        for name in self._defaults:
            local = [item.cpu() if isinstance(item, Tensor) else item for item in getattr(self, name)]
            shares: list[list[Any] | None] = [None] * world
            torch.distributed.all_gather_object(shares, local, group=process_group)
            merged = [item for images in zip_longest(*shares, fillvalue=_MISSING) for item in images
                      if item is not _MISSING]
            setattr(self, name, [item.to(self.device) if isinstance(item, Tensor) else item for item in merged])


class DetectionTask(LattnTask):
    """Mask R-CNN / Faster R-CNN / RetinaNet / FCOS with a registry backbone (see the module docstring)."""

    compiled_part = "detector.backbone"

    def __init__(
        self,
        num_classes: int = 80,
        category_ids: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        detector: Literal["maskrcnn", "fasterrcnn", "retinanet", "fcos"] = "maskrcnn",
        backbone: str = "pyramid_tiny",
        backbone_options: dict[str, Any] | None = None,
        attention: str = "efficient",
        attention_options: dict[str, Any] | None = None,
        net: DetectorOptions = DetectorOptions(),  # noqa: B008 (frozen: never modified)
        num_logged_images: int = 2,
        logged_score_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_classes: object categories, without the background; linked from ``data.num_classes``.
            category_ids: the COCO category id of each label (label l -> ``category_ids[l - 1]``), for the
                results JSON; linked from the datamodule. Default: ids 1..num_classes.
            class_names: names of the labels, for drawn predictions; linked from the datamodule.
            detector: ``maskrcnn`` (boxes + masks), ``fasterrcnn``, ``retinanet`` or ``fcos`` (boxes).
            backbone: registered backbone with a feature pyramid (``lattn list backbones``).
            backbone_options: the backbone's own options (e.g. ``pretrained``, ``drop_path_rate``).
            attention: registered mechanism of the backbone (``lattn list attention``).
            attention_options: that mechanism's own options.
            net: the rest of the detector's architecture (:class:`~lattn_app.models.detection.DetectorOptions`:
                neck, anchors, head widths and sampling, proposals, score threshold, head norm).
            num_logged_images: images of the first validation batch drawn to TensorBoard with their detections.
            logged_score_threshold: the least score of a drawn detection.
            **kwargs: the training options of :class:`~lattn_app.tasks.base.LattnTask` (``lr``, ...).
        """
        super().__init__(**kwargs)
        net = DetectorOptions.of(net)
        self.save_hyperparameters()
        self.hparams["net"] = asdict(net)  # checkpoints hold plain values (they load with weights_only=True)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (object categories, without the background); got {num_classes}")
        if category_ids is not None and len(category_ids) != num_classes:
            raise ValueError(f"category_ids has {len(category_ids)} ids but num_classes is {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.num_classes = num_classes
        self.category_ids = [int(i) for i in category_ids] if category_ids is not None else list(range(1, num_classes + 1))
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in self.category_ids]
        self.with_masks = detector == "maskrcnn"
        self.num_logged_images = num_logged_images
        self.logged_score_threshold = logged_score_threshold
        options = backbone_options_with_attention(backbone, backbone_options, attention, attention_options)
        self.detector = build_detector(detector, num_classes, backbone, options, net)
        self.backbone = self.detector.backbone.backbone
        iou_types = ("bbox", "segm") if self.with_masks else ("bbox",)
        self.val_map = GatheredMeanAveragePrecision(iou_type=iou_types, backend="pycocotools")
        self.test_map = GatheredMeanAveragePrecision(iou_type=iou_types, backend="pycocotools")

    # --- inference ------------------------------------------------------------------------------------
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Images in [0, 1], each (3, H, W) -> detections in the pixels of those images.

        Each detection dict has ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) (1..num_classes) and,
        with Mask R-CNN, ``masks`` (N, 1, H, W) probabilities.
        """
        detections = self.detector([self.normalize(image[None])[0] for image in images])
        # One-stage heads (RetinaNet, FCOS) also score label 0, which no target ever has (torchvision's
        # label convention): drop those so that every detection names an object class.
        return [{k: v[d["labels"] > 0] for k, v in d.items()} for d in detections]

    def detect(self, images: list[Tensor], targets: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Detections in the pixels of each ORIGINAL image (``orig_size`` of its target), masks as booleans."""
        return [to_original_size(d, t["size"], t["orig_size"]) for d, t in zip(self(images), targets)]

    # --- training -------------------------------------------------------------------------------------
    def batch_size_of(self, batch: tuple[list[Tensor], list[dict[str, Any]]]) -> int:
        return len(batch[0])

    def training_loss(self, batch: tuple[list[Tensor], list[dict[str, Any]]]) -> Tensor:
        images, targets = batch
        losses = self.detector([self.normalize(image[None])[0] for image in images], targets)
        for name, value in losses.items():
            self.log(f"train_{name}", value, batch_size=len(images))
        return sum(losses.values())

    # --- evaluation -----------------------------------------------------------------------------------
    def _evaluate(self, batch, metric: MeanAveragePrecision) -> list[dict[str, Tensor]]:
        images, targets = batch
        detections = self.detect(images, targets)
        metric.update(detections, [ground_truth(t, self.with_masks) for t in targets])
        return detections

    def validation_step(self, batch, batch_idx: int) -> None:
        detections = self._evaluate(batch, self.val_map)
        if batch_idx == 0:
            self.log_images(batch[1], detections)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def _log_map(self, metric: MeanAveragePrecision, prefix: str) -> None:
        results = metric.compute()
        for iou_type in metric.iou_type:
            for key in LOGGED_AP_KEYS:
                name = f"{iou_type}_{key}" if len(metric.iou_type) > 1 else key
                self.log(f"{prefix}{iou_type}_{key}", results[name].float(), sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val_")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test_")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per image: ids, file, boxes (xyxy, original pixels), scores, labels, COCO category ids, RLE masks."""
        images, targets = batch
        results = []
        for detection, target in zip(self.detect(images, targets), targets):
            labels = detection["labels"].cpu()
            result = {
                "image_id": target["image_id"], "file_name": target["file_name"], "path": target.get("path"),
                "boxes": detection["boxes"].float().cpu(), "scores": detection["scores"].float().cpu(),
                "labels": labels, "category_ids": [self.category_ids[int(label) - 1] for label in labels],
            }
            if self.with_masks:
                result["masks"] = encode_masks(detection["masks"])
            results.append(result)
        return results

    # --- reporting ------------------------------------------------------------------------------------
    def summary_line(self) -> str | None:
        """Validation box (and mask) AP."""
        metrics = self.trainer.callback_metrics
        if "val_bbox_map" not in metrics:
            return None
        parts = [f"box AP {float(metrics['val_bbox_map']):.3f} (AP50 {float(metrics['val_bbox_map_50']):.3f})"]
        if "val_segm_map" in metrics:
            parts.append(f"mask AP {float(metrics['val_segm_map']):.3f} (AP50 {float(metrics['val_segm_map_50']):.3f})")
        return "Validation " + ", ".join(parts)

    @rank_zero_only
    def log_images(self, targets: list[dict[str, Any]], detections: list[dict[str, Tensor]]) -> None:
        """A few validation images (read back at their original size) with their detections to TensorBoard."""
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        for index, (target, detection) in enumerate(zip(targets[: self.num_logged_images], detections)):
            image = torch.from_numpy(read_image(target["path"])).permute(2, 0, 1).float() / 255.0
            drawn = draw_detections(image, detection, self.class_names, self.logged_score_threshold)
            self.logger.experiment.add_image(f"val/{index}/detections", drawn, self.global_step)


def to_original_size(detection: dict[str, Tensor], size: Sequence[int], orig_size: Sequence[int]) -> dict[str, Tensor]:
    """Map a detection made on an image resized to `size` (H, W) back to the original image `orig_size`."""
    (h, w), (h0, w0) = size, orig_size
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], dtype=detection["boxes"].dtype, device=detection["boxes"].device)
    result = {**detection, "boxes": detection["boxes"] * scale}
    if "masks" in detection:
        masks = detection["masks"]
        if masks.shape[0] and (h, w) != (h0, w0):
            masks = F.interpolate(masks.float(), size=(h0, w0), mode="bilinear", align_corners=False)
        result["masks"] = masks.reshape(masks.shape[0], h0, w0) > MASK_THRESHOLD
    return result


def ground_truth(target: dict[str, Any], with_masks: bool) -> dict[str, Tensor]:
    """A validation/test target (original pixels) in MeanAveragePrecision's format, crowd and area included."""
    result = {"boxes": target["boxes"], "labels": target["labels"], "iscrowd": target["iscrowd"], "area": target["area"]}
    if with_masks:
        result["masks"] = target["masks"].bool()
    return result


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """Boolean masks (N, H, W) -> COCO compressed RLEs with ``counts`` as str (JSON-ready)."""
    array = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(array) if array.shape[2] else []
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def draw_detections(image: Tensor, detection: dict[str, Any], class_names: Sequence[str],
                    score_threshold: float) -> Tensor:
    """uint8 (3, H, W) image with boxes, labels with scores and (if present) masks drawn on it."""
    picture = (image.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8)
    keep = detection["scores"].detach().cpu() >= score_threshold
    boxes = detection["boxes"].detach().float().cpu()[keep]
    labels = [f"{class_names[int(l) - 1]} {float(s):.2f}"
              for l, s in zip(detection["labels"].cpu()[keep], detection["scores"].cpu()[keep])]
    masks = detection.get("masks")
    if masks is not None and len(masks):
        masks = masks.detach().cpu()
        masks = masks.reshape(masks.shape[0], *masks.shape[-2:])[keep]
        masks = masks if masks.dtype == torch.bool else masks > MASK_THRESHOLD
        if len(masks):
            picture = draw_segmentation_masks(picture, masks, alpha=0.45)
    if len(boxes):
        picture = draw_bounding_boxes(picture, boxes, labels=labels, width=2)
    return picture


def coco_results(result: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's prediction (an item of ``DetectionTask.predict_step``'s list) in COCO results format.

    Returns the box results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` and, when the
    prediction has masks, the mask results ``{"image_id", "category_id", "segmentation": RLE, "score"}``.
    Values are kept at full float precision so that COCOeval on them reproduces ``lattn test`` exactly.
    """
    bbox, segm = [], []
    for i, (box, score, category_id) in enumerate(zip(result["boxes"].tolist(), result["scores"].tolist(),
                                                      result["category_ids"])):
        x1, y1, x2, y2 = box
        common = {"image_id": int(result["image_id"]), "category_id": int(category_id), "score": score}
        bbox.append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
        if "masks" in result:
            segm.append({**common, "segmentation": result["masks"][i]})
    return bbox, segm


class DetectionPredictionWriter(LattnPredictionWriter):
    """Writes ``lattn predict`` output of a DetectionTask under `output_dir`.

    - ``bbox_results.json``: COCO results format ``[{"image_id", "category_id", "bbox": [x, y, w, h],
      "score"}, ...]`` with the original category ids, in original image pixels;
    - ``segm_results.json`` (Mask R-CNN): ``[{"image_id", "category_id", "segmentation": RLE, "score"}, ...]``;
      both load with pycocotools' ``COCO.loadRes`` and score with ``COCOeval`` against the split's JSON
      (predict with ``--data.predict_split test`` to keep the COCO image ids);
    - ``images/<file>.png``: each image with its detections of score >= `draw_score_threshold` drawn
      (`max_drawn_images` of them; 0: none).

    An earlier run's files are not replaced unless ``--overwrite true``
    (:class:`~lattn_app.tasks.prediction_writer.LattnPredictionWriter`).
    """

    def __init__(self, output_dir: str = "predictions", draw_score_threshold: float = 0.5,
                 max_drawn_images: int | None = 100, overwrite: bool = False) -> None:
        super().__init__(output_dir, overwrite)
        self.draw_score_threshold = draw_score_threshold
        self.max_drawn_images = max_drawn_images
        self.bbox_results: list[dict[str, Any]] = []
        self.segm_results: list[dict[str, Any]] = []
        self.drawn = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self.bbox_results, self.segm_results, self.drawn = [], [], 0
        if trainer.is_global_zero:  # refused before any image is predicted, not at the end
            masks = getattr(pl_module, "with_masks", False)
            for name in ("bbox_results.json", "segm_results.json") if masks else ("bbox_results.json",):
                self.refuse_earlier(name)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for result in prediction:
            bbox, segm = coco_results(result)
            self.bbox_results += bbox
            self.segm_results += segm
            if result.get("path") and (self.max_drawn_images is None or self.drawn < self.max_drawn_images):
                self.draw(result, pl_module.class_names)

    def draw(self, result: dict[str, Any], class_names: Sequence[str]) -> None:
        image = torch.from_numpy(read_image(result["path"])).permute(2, 0, 1).float() / 255.0
        detection = {"boxes": result["boxes"], "scores": result["scores"], "labels": result["labels"]}
        if "masks" in result and result["masks"]:
            decoded = mask_utils.decode([{**rle, "counts": rle["counts"].encode("ascii")} for rle in result["masks"]])
            detection["masks"] = torch.from_numpy(decoded).permute(2, 0, 1).bool()
        drawn = draw_detections(image, detection, class_names, self.draw_score_threshold)
        path = self.target(Path("images") / Path(result["file_name"]).with_suffix(".png"), str(result["path"]))
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)
        self.drawn += 1

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        bbox, segm = self.bbox_results, self.segm_results
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # gather every rank's results
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (bbox, segm))
            bbox = [r for part in gathered for r in part[0]]
            segm = [r for part in gathered for r in part[1]]
        if not trainer.is_global_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        written = [self._write_json("bbox_results.json", bbox)]
        if getattr(pl_module, "with_masks", False):
            written.append(self._write_json("segm_results.json", segm))
        print(f"Detections of {len({r['image_id'] for r in bbox})} images written to "
              f"{', '.join(str(p) for p in written)}; drawn images in {(self.output_dir / 'images').resolve()}",
              flush=True)

    def _write_json(self, name: str, results: list[dict[str, Any]]) -> Path:
        path = self.target(name)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(results))
        temporary.replace(path)
        return path.resolve()
