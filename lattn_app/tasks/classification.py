"""ClassificationTask: image classification with any registered backbone and attention mechanism.

Training: cross-entropy with label smoothing, or timm's mixup / cutmix with soft-target
cross-entropy; the optimiser, schedule, normalisation, layer-wise learning-rate decay and backbone
freezing are :class:`~lattn_app.tasks.base.LattnTask`'s options. Optional:

- **Knowledge distillation** (DeiT's, as CARE trains; :mod:`lattn_app.tasks.distillation`): a teacher
  from ``teacher_checkpoint`` labels every training batch. The distillation loss goes to the
  distillation head when the backbone has one (CARE returns ``(class_logits, distill_logits)`` in
  training), else to the logits; loss = (1 - alpha) * classification + alpha * distillation. A
  backbone with a distillation head but no teacher trains both heads on the labels (it averages them
  at evaluation).
- **EMA of the weights**: the :class:`~lattn_app.callbacks.LattnEMA` callback in ``trainer.callbacks``
  (any task can use it): validation runs on the averaged weights and checkpoints hold them.

Metrics (torchmetrics, per stage, prefixes ``train_`` / ``val_`` / ``test_``): ``acc`` (top-1) and
``acc_top5`` (top-min(5, num_classes)), micro-averaged over samples; ``val_loss`` / ``test_loss`` are
the plain cross-entropy. Training accuracy is logged only without mixup / cutmix (mixed images have
no single label). ``predict`` returns, per image, its path, predicted class (index, name, probability)
and the top 5; :class:`~lattn_app.tasks.classification_writer.ClassificationPredictionWriter` writes
them to a CSV file.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ..backbones import create_backbone
from ..backbones.timm_weights import load_pretrained
from ..registry import BACKBONES, check_choice
from .base import LattnTask, backbone_options_with_attention
from .distillation import Distillation, DistillationType, check_distillation

log = logging.getLogger(__name__)

__all__ = ["ClassificationTask", "accuracy_metrics", "build_classifier_backbone"]

TOP_K = 5
MixupMode = Literal["batch", "pair", "elem"]


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 (``acc``) and top-min(5, C) (``acc_top5``) accuracy over samples, keys prefixed by `prefix`."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc_top5": MulticlassAccuracy(num_classes, top_k=min(TOP_K, num_classes), average="micro"),
        },
        prefix=prefix,
    )


class ClassificationTask(LattnTask):
    """Image classification with a registered backbone (``lattn list backbones``) and any attention."""

    def __init__(
        self,
        # Shaped like the backbones' own signatures on purpose (explicit arguments: exact --help).
        backbone: str = "vit_small",
        attention: str | None = None,
        attention_options: dict[str, Any] | None = None,
        backbone_options: dict[str, Any] | None = None,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: MixupMode = "batch",
        teacher_checkpoint: str | None = None,
        teacher_backbone: str | None = None,
        distillation_type: DistillationType = "hard",
        distillation_alpha: float = 0.5,
        distillation_tau: float = 1.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            backbone: registered backbone name (``lattn list backbones``), e.g. ``vit_small``, ``vix_cifar``,
                ``care_s0``, ``couplformer``.
            attention: the backbone's attention mechanism (``lattn list attention``), e.g. ``efficient``;
                None: the backbone's own default.
            attention_options: that mechanism's own options (e.g. ``{num_features: 110}`` for performer).
            backbone_options: the backbone's own options, e.g. ``img_size``,
                ``drop_path_rate``, ``pretrained`` (a local weights file, a lattn ``.ckpt`` or a timm model
                name; for backbones without a ``pretrained`` option the task loads it the same way). Not
                ``num_classes`` (the task's own argument) nor ``attention``/``attention_options`` (above).
            num_classes: classifier outputs; the backbone's head is built for it (a pretrained head of
                another class count stays initialised). Linked from ``data.num_classes`` by the CLI.
            class_names: one name per class, used by ``predict``; linked from ``data.class_names``.
                None: classes are named by their index.
            label_smoothing: label smoothing of the cross-entropy (also of the mixup targets).
            mixup_alpha: mixup Beta(alpha, alpha) parameter; > 0 enables timm's Mixup.
            cutmix_alpha: cutmix Beta parameter; > 0 enables cutmix (with mixup too: one of the two
                per batch, chosen with `mixup_switch_prob`).
            mixup_prob: probability of mixing a batch when mixup or cutmix is enabled.
            mixup_switch_prob: probability of cutmix instead of mixup when both are enabled.
            mixup_mode: what one mixing draw applies to (timm's modes): the whole ``batch``, each ``pair``
                of samples, or each ``elem``ent.
            teacher_checkpoint: knowledge distillation teacher: a lattn ``ClassificationTask`` ``.ckpt``
                (the weights it evaluates with: the averaged ones of a run with EMA), a weights file
                (``.pth``, ``.safetensors``, ...) of the architecture `teacher_backbone`, or, without
                `teacher_backbone`, a timm model name with pretrained weights (needs network access).
                None: no distillation.
            teacher_backbone: the teacher's architecture for a weights file: a timm model name (e.g.
                ``regnety_160``; it gets the ImageNet normalisation of its timm config) or a registered lattn
                backbone (it gets this task's `mean` / `std`). Built with `num_classes` outputs.
            distillation_type: ``hard`` (DeiT and CARE: the teacher's arg-max as the label) or ``soft``
                (KL divergence at temperature `distillation_tau`).
            distillation_alpha: weight of the distillation loss; the classification loss gets 1 - alpha.
            distillation_tau: temperature of soft distillation.
            **kwargs: the optimiser, schedule, normalisation and loss-guard options of
                :class:`~lattn_app.tasks.base.LattnTask` (``lr``, ``weight_decay``, ``warmup_epochs``,
                ``min_lr_ratio``, ``layer_decay``, ``freeze_backbone``, ``mean``, ``std``,
                ``on_nonfinite_loss``). With ``freeze_backbone`` the classifier head(s) still train
                (linear probing).
        """
        if "ema_decay" in kwargs:
            raise ValueError("ClassificationTask has no ema_decay: the average of the weights is a callback for every "
                             "task, trainer.callbacks: [{class_path: LattnEMA, init_args: {decay: 0.9998}}]")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes} classes")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0; got {mixup_alpha}, {cutmix_alpha}")
        check_choice("mixup_mode", mixup_mode, ("batch", "pair", "elem"))
        check_distillation(distillation_type, distillation_alpha, distillation_tau)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.label_smoothing = label_smoothing

        self.backbone = build_classifier_backbone(
            backbone, backbone_options_with_attention(backbone, backbone_options, attention, attention_options),
            num_classes)

        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=label_smoothing,
                               num_classes=num_classes)
        self.soft_target_loss = SoftTargetCrossEntropy()
        self.distillation = None
        if teacher_checkpoint is not None:
            self.distillation = Distillation(teacher_checkpoint, teacher_backbone, num_classes,
                                             self.mean.flatten().tolist(), self.std.flatten().tolist(),
                                             distillation_type, distillation_alpha, distillation_tau)

        self.train_metrics = accuracy_metrics(num_classes, "train_") if self.mixup is None else None
        self.val_metrics = accuracy_metrics(num_classes, "val_")
        self.test_metrics = accuracy_metrics(num_classes, "test_")
        # Mean loss over samples; as a metric its sums (not the ranks' means) are reduced under DDP.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # --- the network ------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Images in [0, 1] (B, 3, H, W) -> logits (B, num_classes); a distilled backbone in training
        mode returns ``(class_logits, distill_logits)``."""
        return self.backbone(self.normalize(images))

    def classifier_heads(self) -> list[nn.Module]:
        """The backbone's classifier head(s), which stay trainable under ``freeze_backbone``."""
        return [module for name in ("head", "dist_head") if isinstance(module := getattr(self.backbone, name, None), nn.Module)]

    def teacher(self) -> nn.Module | None:
        """The frozen distillation teacher (loaded on first use), or None without ``teacher_checkpoint``."""
        return self.distillation.teacher() if self.distillation is not None else None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.freeze_backbone:
            for head in self.classifier_heads():
                head.requires_grad_(True)
        if stage == "fit":
            self.teacher()  # load now, so a bad teacher path fails before training starts

    # --- losses -----------------------------------------------------------------------------------
    def classification_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Soft-target cross-entropy for mixed (B, C) targets, else label-smoothed cross-entropy."""
        if targets.dim() == 2:
            return self.soft_target_loss(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mixup / cutmix of a training batch (soft targets), or the batch as it is."""
        if self.mixup is None:
            return images, labels
        if images.shape[0] % 2:  # timm mixes pairs of samples; an odd (last) batch trains unmixed
            return images, labels
        return self.mixup(images, labels)

    def training_loss(self, batch: dict[str, Any]) -> Tensor:
        labels = batch["label"]
        images, targets = self.mix(batch["image"], labels)
        outputs = self.backbone(self.normalize(images))
        if isinstance(outputs, (tuple, list)):
            logits, distill_logits = outputs
        else:
            logits = distill_logits = outputs
        loss = self.classification_loss(logits, targets)
        if self.distillation is not None:
            distill = self.distillation.loss(distill_logits, images, next(self.backbone.parameters()).dtype)
            loss = (1 - self.distillation.alpha) * loss + self.distillation.alpha * distill
            self.log("train_distillation_loss", distill)
        elif distill_logits is not logits:  # a distillation head without a teacher learns the labels too
            loss = (loss + self.classification_loss(distill_logits, targets)) / 2
        if self.train_metrics is not None:
            prediction = logits if distill_logits is logits else (logits + distill_logits) / 2
            self.train_metrics.update(prediction.detach(), labels)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    # --- evaluation -------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, stage: str) -> None:
        logits = self(batch["image"])
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels)
        metrics.update(logits, labels)
        loss_metric = getattr(self, f"{stage}_loss")
        loss_metric.update(loss, weight=labels.shape[0])
        self.log(f"{stage}_loss", loss_metric, prog_bar=True)
        self.log_dict(metrics, prog_bar=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names is not None else str(index)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One dict per image: ``path``, ``class_index``, ``class_name``, ``probability`` and ``top5``
        (a list of ``{class_index, class_name, probability}``, most probable first)."""
        probabilities = self(batch["image"]).float().softmax(dim=-1)
        top_p, top_i = probabilities.topk(min(TOP_K, self.num_classes), dim=-1)
        paths = batch.get("path") or [f"batch{batch_idx}_{i}" for i in range(probabilities.shape[0])]
        predictions = []
        for path, p_row, i_row in zip(paths, top_p.tolist(), top_i.tolist()):
            top = [{"class_index": i, "class_name": self.class_name(i), "probability": p} for p, i in zip(p_row, i_row)]
            predictions.append({"path": str(path), **top[0], "top5": top})
        return predictions

    def summary_line(self) -> str | None:
        """The last validation accuracy next to chance."""
        metrics = self.trainer.callback_metrics
        if "val_acc" not in metrics:
            return None
        return f"Validation accuracy {float(metrics['val_acc']):.3f} (chance {1 / self.num_classes:.3f})"


def build_classifier_backbone(name: str, options: dict[str, Any] | None, num_classes: int) -> nn.Module:
    """Backbone `name` with its `options` and a `num_classes` head.

    ``pretrained`` is loaded by the task for backbones that have no such option (``load_report`` is set
    on the backbone either way).
    """
    options = dict(options or {})
    if "num_classes" in options:
        raise ValueError(
            "backbone_options must not set num_classes: the task builds the head for its own num_classes "
            "(linked from data.num_classes on the command line)"
        )
    pretrained = None
    if "pretrained" in options and not BACKBONES.get(name).accepts("pretrained"):
        pretrained = options.pop("pretrained")
    model = create_backbone(name, num_classes=num_classes, **options)
    if pretrained:
        model.load_report = load_pretrained(model, pretrained)
    report = getattr(model, "load_report", None)
    if report is not None:
        log.info("%s", report)
    return model
