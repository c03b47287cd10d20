"""ClassificationTask: image classification with any registered backbone and attention mechanism.

Training: cross-entropy with label smoothing, or timm's mixup / cutmix with soft-target
cross-entropy; AdamW with warm-up and cosine decay, layer-wise learning-rate decay and backbone
freezing come from :class:`~lattn_app.tasks.base.LattnTask`. Optional:

- **EMA of the weights** (``ema_decay``, timm's ``ModelEmaV3``): validation, test and predict use the
  averaged weights. A checkpoint stores them under ``state_dict_ema`` with the ``backbone.`` keys of the
  online weights (timm's convention), so ``pretrained=`` and ``teacher_checkpoint=`` read the EMA
  weights of such a checkpoint.
- **Knowledge distillation** (DeiT's, as CARE trains): a teacher from ``teacher_checkpoint`` (a lattn
  ``ClassificationTask`` ``.ckpt``, or a weights file with ``teacher_backbone`` naming its timm or lattn
  architecture) labels every training batch; hard distillation trains on the teacher's arg-max, soft
  distillation on its temperature-``tau`` distribution. The distillation loss goes to the distillation
  head when the backbone has one (CARE returns ``(class_logits, distill_logits)`` in training), else
  to the logits; loss = (1 - alpha) * classification + alpha * distillation. The teacher is loaded for
  ``fit`` only and is not part of the checkpoint. A backbone with a distillation head but no teacher
  trains both heads on the labels (it averages them at evaluation).

Metrics (torchmetrics, per stage, prefixes ``train_`` / ``val_`` / ``test_``): ``acc`` (top-1) and
``acc_top5`` (top-min(5, num_classes)), micro-averaged over samples; ``val_loss`` / ``test_loss`` are
the plain cross-entropy. Training accuracy is logged only without mixup / cutmix (mixed images have
no single label). ``predict`` returns, per image, its path, predicted class (index, name, probability)
and the top 5; :class:`ClassificationPredictionWriter` writes them to a CSV file.
"""

from __future__ import annotations

import csv
import inspect
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ..backbones import create_backbone
from ..backbones.timm_weights import load_pretrained, read_state_dict
from ..registry import BACKBONES, check_choice
from .base import IMAGENET_MEAN, IMAGENET_STD, LattnTask

log = logging.getLogger(__name__)

DISTILLATION_TYPES = ("hard", "soft")
EMA_PREFIX = "ema.module."
TOP_K = 5


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 (``acc``) and top-min(5, C) (``acc_top5``) accuracy over samples, keys prefixed by `prefix`."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc_top5": MulticlassAccuracy(num_classes, top_k=min(TOP_K, num_classes), average="micro"),
        },
        prefix=prefix,
    )


def distillation_loss(student: Tensor, teacher: Tensor, kind: str, tau: float) -> Tensor:
    """DeiT's distillation loss of student logits against teacher logits (both (B, C)).

    ``hard``: cross-entropy with the teacher's arg-max as the label. ``soft``: KL divergence of the
    temperature-`tau` distributions, scaled by tau^2 and averaged over the logits (DeiT's formula).
    """
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    return F.kl_div(
        F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum", log_target=True
    ) * (tau * tau) / student.numel()


class _NormalizedTeacher(nn.Module):
    """A frozen classifier that takes images in [0, 1] and returns one logit tensor."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.model = model
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if self.normalize:
            images = (images - self.mean) / self.std
        logits = self.model(images)
        if isinstance(logits, (tuple, list)):  # a distilled model in training mode: class and distillation heads
            logits = sum(logits) / len(logits)
        return logits


class ClassificationTask(LattnTask):
    """Image classification with a registered backbone (``lattn list backbones``) and any attention."""

    def __init__(
        self,
        backbone: str = "vit_small",
        backbone_options: dict[str, Any] | None = None,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        teacher_checkpoint: str | None = None,
        teacher_backbone: str | None = None,
        distillation_type: str = "hard",
        distillation_alpha: float = 0.5,
        distillation_tau: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
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
            backbone: registered backbone name (``lattn list backbones``), e.g. ``vit_small``, ``vix_cifar``,
                ``care_s0``, ``couplformer``.
            backbone_options: the backbone's own options, e.g. ``attention: efficient``, ``img_size``,
                ``drop_path_rate``, ``pretrained`` (a local weights file, a lattn ``.ckpt`` or a timm model
                name; for backbones without a ``pretrained`` option the task loads it the same way). Not
                ``num_classes``: that is the task's own argument.
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
            ema_decay: decay of an exponential moving average of the weights (e.g. 0.9998), updated after
                every optimiser step; validation, test and predict then use the averaged weights. None: off.
            teacher_checkpoint: knowledge distillation teacher: a lattn ``ClassificationTask`` ``.ckpt``
                (its EMA weights when it has them), a weights file (``.pth``, ``.safetensors``, ...) of the
                architecture `teacher_backbone`, or, without `teacher_backbone`, a timm model name with
                pretrained weights (needs network access). None: no distillation.
            teacher_backbone: the teacher's architecture for a weights file: a timm model name (e.g.
                ``regnety_160``; it gets the ImageNet normalisation of its timm config) or a registered lattn
                backbone (it gets this task's `mean` / `std`). Built with `num_classes` outputs.
            distillation_type: ``hard`` (DeiT and CARE: the teacher's arg-max as the label) or ``soft``
                (KL divergence at temperature `distillation_tau`).
            distillation_alpha: weight of the distillation loss; the classification loss gets 1 - alpha.
            distillation_tau: temperature of soft distillation.
            lr, weight_decay, warmup_epochs, min_lr_ratio, layer_decay, freeze_backbone, mean, std,
                on_nonfinite_loss: the optimiser, schedule, normalisation and loss-guard settings of
                :class:`~lattn_app.tasks.base.LattnTask`. With ``freeze_backbone`` the classifier head(s)
                still train (linear probing).
        """
        super().__init__(lr, weight_decay, warmup_epochs, min_lr_ratio, layer_decay, freeze_backbone, mean, std,
                         on_nonfinite_loss)
        self.save_hyperparameters()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes} classes")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0; got {mixup_alpha}, {cutmix_alpha}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.9998) or null; got {ema_decay}")
        check_choice("distillation_type", distillation_type, DISTILLATION_TYPES)
        if not 0.0 <= distillation_alpha <= 1.0 or distillation_tau <= 0:
            raise ValueError(f"need 0 <= distillation_alpha <= 1 and distillation_tau > 0; got "
                             f"{distillation_alpha}, {distillation_tau}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.label_smoothing = label_smoothing
        self.distillation_type = distillation_type
        self.distillation_alpha = distillation_alpha
        self.distillation_tau = distillation_tau
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_backbone = teacher_backbone
        self._teacher: list[nn.Module] = []  # a plain list: the teacher is neither a submodule nor saved

        self.backbone = build_classifier_backbone(backbone, backbone_options, num_classes)

        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, label_smoothing=label_smoothing, num_classes=num_classes)
        self.soft_target_loss = SoftTargetCrossEntropy()

        self.ema: ModelEmaV3 | None = None
        if ema_decay is not None:
            self.ema = ModelEmaV3(self.backbone, decay=ema_decay)
            # Only run in eval mode (see network()); left in train mode like the rest so that Lightning's
            # train/eval switching covers it without a warning about modules in eval mode.
            self.ema.requires_grad_(False).train()
        self._ema_step = -1

        self.train_metrics = accuracy_metrics(num_classes, "train_") if self.mixup is None else None
        self.val_metrics = accuracy_metrics(num_classes, "val_")
        self.test_metrics = accuracy_metrics(num_classes, "test_")
        # Mean loss over samples; as a metric its sums (not the ranks' means) are reduced under DDP.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # --- the network ------------------------------------------------------------------------------
    def network(self) -> nn.Module:
        """The backbone that runs now: the EMA weights when enabled and not training, else the online ones."""
        if self.ema is not None and not self.training:
            return self.ema.module
        return self.backbone

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Images in [0, 1] (B, 3, H, W) -> logits (B, num_classes); a distilled backbone in training
        mode returns ``(class_logits, distill_logits)``."""
        return self.network()(self.normalize(images))

    def classifier_heads(self) -> list[nn.Module]:
        """The backbone's classifier head(s), which stay trainable under ``freeze_backbone``."""
        return [module for name in ("head", "dist_head") if isinstance(module := getattr(self.backbone, name, None), nn.Module)]

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
        teacher = self.teacher()
        if teacher is not None:
            teacher = self._place_teacher(teacher, images)
            with torch.no_grad():
                teacher_logits = teacher(images)
            if teacher_logits.shape != distill_logits.shape:
                raise ValueError(
                    f"the teacher ({self.teacher_checkpoint}) gives logits of shape {tuple(teacher_logits.shape)}, "
                    f"the student {tuple(distill_logits.shape)}; the teacher must have num_classes={self.num_classes}"
                )
            distill = distillation_loss(distill_logits, teacher_logits.to(distill_logits.dtype),
                                        self.distillation_type, self.distillation_tau)
            loss = (1 - self.distillation_alpha) * loss + self.distillation_alpha * distill
            self.log("train_distillation_loss", distill)
        elif distill_logits is not logits:  # a distillation head without a teacher learns the labels too
            loss = (loss + self.classification_loss(distill_logits, targets)) / 2
        if self.train_metrics is not None:
            prediction = logits if distill_logits is logits else (logits + distill_logits) / 2
            self.train_metrics.update(prediction.detach(), labels)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    # --- EMA --------------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Once per optimiser step (gradient accumulation calls this for every micro-batch).
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.ema.update(self.backbone)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the EMA weights under ``state_dict_ema`` with the online weights' ``backbone.`` keys."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        ema_keys = [key for key in state if key.startswith(EMA_PREFIX)]
        if ema_keys:
            checkpoint["state_dict_ema"] = {"backbone." + key[len(EMA_PREFIX):]: state.pop(key) for key in ema_keys}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put ``state_dict_ema`` back in place; a checkpoint without EMA starts the EMA from its weights."""
        state = checkpoint.get("state_dict")
        if state is not None and self.ema is not None:
            ema_state = checkpoint.get("state_dict_ema")
            if ema_state is None:
                ema_state = {key: value for key, value in state.items() if key.startswith("backbone.")}
            for key, value in ema_state.items():
                state[EMA_PREFIX + key[len("backbone."):]] = value
        super().on_load_checkpoint(checkpoint)  # with the EMA weights in place: checks the checkpoint fits

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

    def on_fit_end(self) -> None:
        self.print_summary()

    @rank_zero_only
    def print_summary(self) -> None:
        """The end-of-training line: best validation accuracy and where its checkpoint is."""
        checkpoint = self.trainer.checkpoint_callback
        metrics = self.trainer.callback_metrics
        if "val_acc" not in metrics:
            return
        line = f"Validation accuracy {float(metrics['val_acc']):.3f} (chance {1 / self.num_classes:.3f})"
        if checkpoint is not None and getattr(checkpoint, "best_model_path", ""):
            score = checkpoint.best_model_score
            line += f"\nBest checkpoint: {checkpoint.best_model_path}"
            if score is not None:
                line += f" ({checkpoint.monitor} {float(score):.3f})"
        print(line, flush=True)

    # --- the teacher ------------------------------------------------------------------------------
    def teacher(self) -> nn.Module | None:
        """The frozen distillation teacher (loaded on first use), or None without ``teacher_checkpoint``."""
        if self.teacher_checkpoint is None:
            return None
        if not self._teacher:
            teacher = load_teacher(self.teacher_checkpoint, self.teacher_backbone, self.num_classes,
                                   tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))
            self._teacher.append(teacher.eval().requires_grad_(False))
        return self._teacher[0]

    def _place_teacher(self, teacher: nn.Module, images: Tensor) -> nn.Module:
        parameter = next(teacher.parameters(), None)
        dtype = next(self.backbone.parameters()).dtype
        if parameter is not None and (parameter.device != images.device or parameter.dtype != dtype):
            teacher.to(device=images.device, dtype=dtype)
        return teacher


def build_classifier_backbone(name: str, options: dict[str, Any] | None, num_classes: int) -> nn.Module:
    """Backbone `name` with a `num_classes` head; ``pretrained`` is loaded by the task for backbones
    that have no such option (``load_report`` is set on the backbone either way)."""
    options = dict(options or {})
    if "num_classes" in options:
        raise ValueError(
            "backbone_options must not set num_classes: the task builds the head for its own num_classes "
            "(linked from data.num_classes on the command line)"
        )
    pretrained = None
    builder = BACKBONES.get(name).builder
    if "pretrained" in options and "pretrained" not in inspect.signature(builder).parameters:
        pretrained = options.pop("pretrained")
    model = create_backbone(name, num_classes=num_classes, **options)
    if pretrained:
        model.load_report = load_pretrained(model, pretrained)
    report = getattr(model, "load_report", None)
    if report is not None:
        log.info("%s", report)
    return model


def load_teacher(source: str, architecture: str | None, num_classes: int, mean: Sequence[float],
                 std: Sequence[float]) -> nn.Module:
    """The distillation teacher named by `source` (see ``ClassificationTask``'s ``teacher_checkpoint``).

    Returns a module taking images in [0, 1] and giving logits (B, num_classes).
    """
    path = Path(source).expanduser()
    if path.suffix == ".ckpt" and architecture is None:
        if not path.is_file():
            raise FileNotFoundError(f"teacher_checkpoint {path} does not exist")
        return _task_from_checkpoint(path)
    if architecture is None:
        if path.exists() or "/" in source:
            raise ValueError(
                f"teacher_checkpoint {source} is a weights file: set teacher_backbone to its architecture "
                f"(a timm model name such as regnety_160, or a lattn backbone name)"
            )
        if not timm.is_model(source):
            raise ValueError(f"teacher_checkpoint {source!r} is neither a file nor a timm model name")
        model = timm.create_model(source, pretrained=True, num_classes=num_classes)
        return _NormalizedTeacher(model, model.pretrained_cfg.get("mean", mean), model.pretrained_cfg.get("std", std))
    if not path.is_file():
        raise FileNotFoundError(f"teacher_checkpoint {path} does not exist")
    if architecture in BACKBONES:
        model = build_classifier_backbone(architecture, {"pretrained": str(path)}, num_classes)
        return _NormalizedTeacher(model, mean, std)
    if not timm.is_model(architecture):
        raise ValueError(f"teacher_backbone {architecture!r} is neither a lattn backbone nor a timm model name")
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    state = read_state_dict(str(path))
    model.load_state_dict(state)
    return _NormalizedTeacher(model, model.pretrained_cfg.get("mean", mean), model.pretrained_cfg.get("std", std))


def _task_from_checkpoint(path: Path) -> ClassificationTask:
    """A ClassificationTask rebuilt from its .ckpt alone (its own pretrained weights and teacher are not reloaded)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    accepted = inspect.signature(ClassificationTask.__init__).parameters
    hparams = {key: value for key, value in hparams.items() if key in accepted and key != "self"}
    options = dict(hparams.get("backbone_options") or {})
    options.pop("pretrained", None)
    hparams.update(backbone_options=options, teacher_checkpoint=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = ClassificationTask(**hparams)
    task.on_load_checkpoint(checkpoint)
    task.load_state_dict(checkpoint["state_dict"])
    return task


class ClassificationPredictionWriter(BasePredictionWriter):
    """Writes the predictions of ``lattn predict`` to ``<output_dir>/<filename>`` as CSV.

    Columns: ``path``, ``class`` (name), ``class_index``, ``probability`` and ``top5``
    (``name:probability`` pairs separated by ``;``, most probable first). With several processes each
    writes its own file (``predictions_rank<r>.csv``).
    """

    COLUMNS = ("path", "class", "class_index", "probability", "top5")

    def __init__(self, output_dir: str = "predictions", filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.filename = filename
        self.path: Path | None = None
        self.rows = 0

    def _file(self, trainer) -> Path:
        if trainer.world_size > 1:
            stem = Path(self.filename)
            return self.output_dir / f"{stem.stem}_rank{trainer.global_rank}{stem.suffix}"
        return self.output_dir / self.filename

    def on_predict_start(self, trainer, pl_module) -> None:
        self.path = self._file(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as file:
            csv.writer(file).writerow(self.COLUMNS)
        self.rows = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.path, "a", newline="") as file:
            writer = csv.writer(file)
            for item in prediction:
                top = ";".join(f"{entry['class_name']}:{entry['probability']:.4f}" for entry in item["top5"])
                writer.writerow((item["path"], item["class_name"], item["class_index"], f"{item['probability']:.4f}", top))
                self.rows += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        print(f"Predictions of {self.rows} images written to {self.path.resolve()}", flush=True)
