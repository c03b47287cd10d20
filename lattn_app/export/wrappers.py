"""What is exported of each task: a module that takes images as a deployment has them and does the rest.

Every wrapper takes float32 RGB images in [0, 1], NCHW (what lattn's datamodules give the task), applies
the task's normalisation (:meth:`LattnTask.normalize`, with the task's own mean and std) inside, and
returns plain tensors, so that the exported file needs nothing of lattn to run. Each wrapper also says
what it needs to be traced (:meth:`ExportWrapper.example_inputs`), which input axes may vary
(:meth:`ExportWrapper.dynamic_shapes`) and what a user of the file must know (:meth:`ExportWrapper.metadata`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from .. import __version__
from . import detector
from ..tasks import ClassificationTask, DetectionTask, LattnTask, SegmentationTask, StereoTask
from ..tasks.record import task_name

IMAGE_INPUT = {"dtype": "float32", "layout": "NCHW", "channels": "RGB", "range": [0.0, 1.0]}


def fixed_grid_mechanisms(model: nn.Module) -> list[str]:
    """Names of the fixed-grid attention layers in `model` that refuse other grids (``on_other_grid="error"``)."""
    return sorted({type(module).__name__ for module in model.modules()
                   if getattr(module, "fixed_grid", False) and getattr(module, "on_other_grid", "resample") == "error"})


class ExportWrapper(nn.Module):
    """The exported computation of one task: [0, 1] RGB images in, plain tensors out.

    Subclasses set :attr:`input_names` and :attr:`output_names` and implement ``forward``; the
    parameters are the task's own (frozen: exporting traces inference, never a backward pass).
    """

    input_names: tuple[str, ...] = ("images",)
    output_names: tuple[str, ...] = ()
    dynamic_batch = True  # the batch size may vary in the exported file
    fixed_batch_reason: str | None = None  # why it may not, where it may not

    def __init__(self, task: LattnTask) -> None:
        super().__init__()
        self.task = task.eval().requires_grad_(False)

    def reference(self, *inputs: Tensor) -> Any:
        """The eager computation the exported file must reproduce (the wrapper's own forward, unless the
        exported graph computes it differently)."""
        return self(*inputs)

    # --- sizes --------------------------------------------------------------------------------------
    def size_multiple(self) -> int:
        """Image heights and widths the network takes: multiples of this (its coarsest stride)."""
        return max(int(stride) for stride in self.task.backbone.strides)

    def min_size(self) -> int:
        """The least height and width a dynamic-size export is traced at (one block of the size multiple)."""
        return self.size_multiple()

    def native_size(self) -> tuple[int, int]:
        """The image size the network was configured for (its training size, where it has one)."""
        return (224, 224)

    def fixed_size_reasons(self) -> list[str]:
        """Why the image height and width cannot vary in the exported file (empty: they can)."""
        layers = fixed_grid_mechanisms(self.task)
        if layers:
            return [f"{', '.join(layers)} built with on_other_grid='error' accept only the grid they were built for"]
        return []

    def example_size(self, dynamic: bool) -> tuple[int, int]:
        """The size traced: the native one for a fixed-size export; otherwise one step of the size
        multiple above it in height and two in width, so that height and width differ from each other and
        from the native size (a traced example equal to the native size, or square, would let the tracer
        take the native-size shortcuts and tie height to width)."""
        height, width = self.native_size()
        if not dynamic:
            return height, width
        step = self.size_multiple()
        return height + step, width + 2 * step

    def example_inputs(self, size: tuple[int, int], batch: int = 2) -> tuple[Tensor, ...]:
        """Random [0, 1] inputs of `size` (height, width); batch 2: a batch of 1 would be fixed at 1."""
        generator = torch.Generator().manual_seed(0)
        batch = batch if self.dynamic_batch else 1
        return tuple(torch.rand(batch, 3, *size, generator=generator) for _ in self.input_names)

    def dynamic_shapes(self, dynamic_size: bool) -> dict[str, dict[int, Any]]:
        """torch.export's dynamic_shapes: batch (where the network allows), and height and width as
        multiples of :meth:`size_multiple` (the traced graph then has no branch on padding)."""
        step = self.size_multiple()
        axes: dict[int, Any] = {}
        if self.dynamic_batch:
            axes[0] = Dim("batch", min=1, max=1024)
        if dynamic_size:
            axes[2] = step * Dim("height_blocks", min=1, max=8192 // step)
            axes[3] = step * Dim("width_blocks", min=1, max=8192 // step)
        return {name: axes for name in self.input_names}

    # --- what a user of the file must know ----------------------------------------------------------
    def metadata(self, dynamic_size: bool) -> dict[str, Any]:
        """Task, preprocessing, inputs, outputs and which axes vary; written into the exported file."""
        step = self.size_multiple()
        axes = ["batch"] if self.dynamic_batch else []
        axes += ["height", "width"] if dynamic_size else []
        return {
            "lattn_version": __version__,
            "task": task_name(type(self.task)),
            "inputs": {name: {**IMAGE_INPUT, "shape": ["batch" if self.dynamic_batch else 1, 3, "height", "width"]}
                       for name in self.input_names},
            "preprocessing": "none outside the model: pass RGB images scaled to [0, 1]; the model normalises "
                             "them with mean and std inside",
            "mean": [float(v) for v in self.task.mean.flatten()],
            "std": [float(v) for v in self.task.std.flatten()],
            "dynamic_axes": axes,
            "fixed_batch_reason": self.fixed_batch_reason,
            "size_multiple": step,
            "fixed_size": None if dynamic_size else list(self.native_size()),
            "fixed_size_reasons": self.fixed_size_reasons(),
            "outputs": self.output_descriptions(),
        }

    def output_descriptions(self) -> dict[str, str]:
        raise NotImplementedError


class ClassificationExport(ExportWrapper):
    """images (B, 3, H, W) in [0, 1] -> logits (B, num_classes)."""

    output_names = ("logits",)

    def forward(self, images: Tensor) -> Tensor:
        return self.task(images)

    def native_size(self) -> tuple[int, int]:
        grid = getattr(self.task.backbone, "grid_size", None)
        patch = getattr(getattr(self.task.backbone, "patch_embed", None), "patch_size", None)
        if grid is not None and patch is not None:
            return (int(grid[0]) * int(patch), int(grid[1]) * int(patch))
        return (224, 224)

    def metadata(self, dynamic_size: bool) -> dict[str, Any]:
        task: ClassificationTask = self.task
        names = task.class_names or [str(i) for i in range(task.num_classes)]
        return {**super().metadata(dynamic_size), "num_classes": task.num_classes, "class_names": names}

    def output_descriptions(self) -> dict[str, str]:
        return {"logits": "float32 (batch, num_classes): class scores before softmax; class i is class_names[i]"}


class StereoExport(ExportWrapper):
    """left, right (B, 3, H, W) in [0, 1] -> disparity (B, H, W) in pixels of the left view."""

    input_names = ("left", "right")
    output_names = ("disparity",)

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        return self.task(left, right)

    def size_multiple(self) -> int:
        return int(self.task.net.size_multiple)

    def native_size(self) -> tuple[int, int]:
        height, width = self.task.hparams.get("net", {}).get("img_size", (256, 512))
        return int(height), int(width)

    def metadata(self, dynamic_size: bool) -> dict[str, Any]:
        task: StereoTask = self.task
        return {**super().metadata(dynamic_size), "max_disparity": int(task.max_disparity)}

    def output_descriptions(self) -> dict[str, str]:
        return {"disparity": "float32 (batch, height, width): disparity of each left-view pixel, in pixels, in "
                             "[0, max_disparity - 1]; depth = focal length x baseline / disparity"}


class SegmentationExport(ExportWrapper):
    """images (B, 3, H, W) in [0, 1] -> labels (B, H, W) int64 class indices, logits (B, K, H, W)."""

    output_names = ("labels", "logits")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.task(images)
        return logits.argmax(dim=1), logits

    def native_size(self) -> tuple[int, int]:
        task: SegmentationTask = self.task
        return tuple(task.window) if task.inference == "slide" else (512, 512)

    def fixed_size_reasons(self) -> list[str]:
        reasons = super().fixed_size_reasons()
        if self.task.inference == "slide":
            reasons.append("inference: slide runs one window per position, and how many windows an image has depends "
                           "on its size (export with inference: whole for any size)")
        return reasons

    def metadata(self, dynamic_size: bool) -> dict[str, Any]:
        task: SegmentationTask = self.task
        return {**super().metadata(dynamic_size), "num_classes": task.num_classes, "class_names": task.class_names,
                "category_ids": task.category_ids, "inference": task.inference}

    def output_descriptions(self) -> dict[str, str]:
        return {"labels": "int64 (batch, height, width): class index of each pixel (argmax of logits); index i is "
                          "class_names[i], dataset id category_ids[i]",
                "logits": "float32 (batch, num_classes, height, width): class scores of each pixel before softmax"}


class DetectionExport(ExportWrapper):
    """image (3, H, W) in [0, 1] -> boxes (N, 4), labels (N,), scores (N,)[, masks (N, 1, H, W)].

    Every detector lattn builds (Faster / Mask R-CNN, RetinaNet, FCOS), whole: its inference as
    :mod:`lattn_app.export.detector` computes it (torchvision's detections, with shapes a graph can hold);
    the check compares the exported file with torchvision's own eager inference (:meth:`reference`). One
    image per call: the number of detections N depends on the image (the one data-dependent size of the graph).
    """

    input_names = ("image",)
    dynamic_batch = False
    fixed_batch_reason = "one image (3, H, W) per call: the number of detections N depends on the image"

    def __init__(self, task: LattnTask) -> None:
        super().__init__(task)
        self.inference = detector.inference(task.detector)
        self.output_names = ("boxes", "labels", "scores", "masks") if task.with_masks else ("boxes", "labels", "scores")

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        images = self.task.normalize(image[None])
        height, width = images.shape[-2:]
        padded, features = self.inference.features(images)
        boxes, scores, labels, valid = (t[0] for t in self.inference.detections(padded, features, height, width))
        # DetectionTask drops the one-stage heads' label-0 (background) detections; the rest keep their order:
        # the valid ones first, by their position (a top-k of distinct integers, so no ties to break).
        valid = valid & (labels > 0)
        position = torch.arange(valid.shape[0], 0, -1, device=valid.device)
        order = torch.where(valid, position, 0).topk(valid.shape[0]).indices
        count = valid.sum().item()
        torch._check_is_size(count)
        torch._check(count <= valid.shape[0])
        first = order[:count]
        outputs = {"boxes": boxes[first], "labels": labels[first], "scores": scores[first]}
        if self.inference.with_masks:  # pasted for the N detections only (each is height x width)
            masks = self.inference.masks(features, outputs["boxes"][None], outputs["labels"][None], height, width)
            outputs["masks"] = masks[0][:, None]
        return tuple(outputs[name] for name in self.output_names)

    def reference(self, image: Tensor) -> tuple[Tensor, ...]:
        """torchvision's own inference (DetectionTask's forward), what the exported file must reproduce."""
        detection = self.task([image])[0]
        return tuple(detection[name] for name in self.output_names)

    def min_size(self) -> int:
        """The least height and width of an exported detector: more than its coarsest level's stride, so that
        every level has at least 2 rows and columns (torch.export fixes a size of 1 in the graph)."""
        return max(self.task.detector.backbone.strides) + 1

    def size_multiple(self) -> int:
        return 1  # any size: the detector pads every image itself (to transform.size_divisible)

    def native_size(self) -> tuple[int, int]:
        return (800, 1333)  # COCO's evaluation size; the detector takes images as the datamodule resized them

    def example_inputs(self, size: tuple[int, int], batch: int = 1) -> tuple[Tensor, ...]:
        generator = torch.Generator().manual_seed(0)
        return (torch.rand(3, *size, generator=generator),)

    def dynamic_shapes(self, dynamic_size: bool) -> dict[str, dict[int, Any]]:
        if not dynamic_size:
            return {"image": {}}
        smallest = self.min_size()
        return {"image": {1: Dim("height", min=smallest, max=8192), 2: Dim("width", min=smallest, max=8192)}}

    def metadata(self, dynamic_size: bool) -> dict[str, Any]:
        task: DetectionTask = self.task
        data = super().metadata(dynamic_size)
        data["inputs"] = {"image": {**IMAGE_INPUT, "layout": "CHW", "shape": [3, "height", "width"]}}
        settings = getattr(task.detector, "roi_heads", task.detector)  # a two-stage detector's are its RoI heads'
        return {**data, "num_classes": task.num_classes, "class_names": task.class_names,
                "category_ids": task.category_ids, "min_size": self.min_size(),
                "score_threshold": float(settings.score_thresh),
                "detections_per_image": int(settings.detections_per_img)}

    def output_descriptions(self) -> dict[str, str]:
        described = {
            "boxes": "float32 (N, 4): x1, y1, x2, y2 in pixels of the input image",
            "labels": "int64 (N,): 1..num_classes; label l is class_names[l - 1], COCO category_ids[l - 1]",
            "scores": "float32 (N,): confidence, highest first",
            "masks": "float32 (N, 1, height, width): per-pixel mask probability (threshold at 0.5)",
        }
        return {name: described[name] for name in self.output_names}


class DetectionFeaturesExport(ExportWrapper):
    """images (B, 3, H, W) in [0, 1] -> the detector's feature pyramid (backbone and neck), one map per level.

    What of a torchvision detector torch.export can trace (``--part features``): the dense part, where
    nearly all of the computation is. Anchors, proposals, NMS and the RoI heads then run in Python on
    these maps (``task.detector.rpn`` and ``roi_heads``, as torchvision's GeneralizedRCNN does).
    """

    def __init__(self, task: LattnTask) -> None:
        super().__init__(task)
        self.output_names = tuple(task.detector.backbone.names)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.task.detector.backbone(self.task.normalize(images)).values())

    def size_multiple(self) -> int:
        return int(self.task.detector.transform.size_divisible)  # what the detector pads images to

    def native_size(self) -> tuple[int, int]:
        return (800, 1344)  # COCO's evaluation size (800 x 1333), padded to the size multiple

    def metadata(self, dynamic_size: bool) -> dict[str, Any]:
        task: DetectionTask = self.task
        return {**super().metadata(dynamic_size), "part": "features", "num_classes": task.num_classes,
                "class_names": task.class_names, "category_ids": task.category_ids}

    def output_descriptions(self) -> dict[str, str]:
        return {name: f"float32 (batch, channels, height / 2^{name[1:]}, width / 2^{name[1:]}): feature level {name}"
                for name in self.output_names}


WRAPPERS: dict[type, type[ExportWrapper]] = {
    ClassificationTask: ClassificationExport,
    StereoTask: StereoExport,
    SegmentationTask: SegmentationExport,
    DetectionTask: DetectionExport,
}


PARTS = ("all", "features")  # the whole network, or (detection) its feature pyramid only


def export_wrapper(task: LattnTask, part: str = "all") -> ExportWrapper:
    """The exportable module of `task` (a ValueError for a task lattn cannot export)."""
    if part not in PARTS:
        raise ValueError(f"--part: expected one of {', '.join(PARTS)}; got {part!r}")
    if part == "features":
        if not isinstance(task, DetectionTask):
            raise ValueError(f"--part features applies to DetectionTask (its feature pyramid); {type(task).__name__} "
                             "exports whole (--part all)")
        return DetectionFeaturesExport(task)
    for task_class, wrapper in WRAPPERS.items():
        if isinstance(task, task_class):
            return wrapper(task)
    raise ValueError(f"lattn export knows the tasks {', '.join(c.__name__ for c in WRAPPERS)}; got {type(task).__name__}")
