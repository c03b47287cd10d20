"""Knowledge distillation (DeiT's, as CARE trains): the teacher, its loading and the loss.

A teacher from ``teacher_checkpoint`` (a lattn ``ClassificationTask`` ``.ckpt``, or a weights file with
``teacher_backbone`` naming its timm or lattn architecture, or a timm model name) labels every training
batch; hard distillation trains on the teacher's arg-max, soft distillation on its temperature-``tau``
distribution. The teacher is loaded on first use, frozen, in eval mode, and is neither a submodule of
the student nor part of its checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.timm_weights import read_state_dict
from ..registry import BACKBONES, builder_options, check_choice

__all__ = ["Distillation", "DistillationType", "NormalizedTeacher", "check_distillation", "distillation_loss",
           "load_teacher"]

DistillationType = Literal["hard", "soft"]


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


def check_distillation(kind: str, alpha: float, tau: float) -> None:
    """Raise a ValueError naming the option unless these are valid distillation settings."""
    check_choice("distillation_type", kind, ("hard", "soft"))
    if not 0.0 <= alpha <= 1.0 or tau <= 0:
        raise ValueError(f"need 0 <= distillation_alpha <= 1 and distillation_tau > 0; got {alpha}, {tau}")


class NormalizedTeacher(nn.Module):
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


class Distillation:
    """The distillation settings of a student and its teacher, loaded on first use.

    Not an ``nn.Module``: the teacher is not part of the student's weights, and copies of the student
    (Lightning's weight averaging) share it instead of copying it.
    """

    def __init__(self, source: str, architecture: str | None, num_classes: int, mean: Sequence[float],
                 std: Sequence[float], kind: DistillationType = "hard", alpha: float = 0.5, tau: float = 1.0) -> None:
        check_distillation(kind, alpha, tau)
        self.source, self.architecture, self.num_classes = source, architecture, num_classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.kind, self.alpha, self.tau = kind, alpha, tau
        self._teacher: nn.Module | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> Distillation:
        return self

    def teacher(self) -> nn.Module:
        """The frozen teacher (loaded on the first call)."""
        if self._teacher is None:
            teacher = load_teacher(self.source, self.architecture, self.num_classes, self.mean, self.std)
            self._teacher = teacher.eval().requires_grad_(False)
        return self._teacher

    def loss(self, student_logits: Tensor, images: Tensor, dtype: torch.dtype) -> Tensor:
        """The distillation loss of `student_logits` against the teacher's logits of `images` (in [0, 1])."""
        teacher = self.teacher()
        parameter = next(teacher.parameters(), None)
        if parameter is not None and (parameter.device != images.device or parameter.dtype != dtype):
            teacher.to(device=images.device, dtype=dtype)
        with torch.no_grad():
            teacher_logits = teacher(images)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"the teacher ({self.source}) gives logits of shape {tuple(teacher_logits.shape)}, "
                             f"the student {tuple(student_logits.shape)}; the teacher must have "
                             f"num_classes={self.num_classes}")
        return distillation_loss(student_logits, teacher_logits.to(student_logits.dtype), self.kind, self.tau)


def load_teacher(source: str, architecture: str | None, num_classes: int, mean: Sequence[float],
                 std: Sequence[float]) -> nn.Module:
    """The distillation teacher named by `source` (see ``ClassificationTask``'s ``teacher_checkpoint``).

    Returns a module taking images in [0, 1] and giving logits (B, num_classes).
    """
    from .classification import build_classifier_backbone  # the task module imports this one

    path = Path(source).expanduser()
    if path.suffix == ".ckpt" and architecture is None:
        if not path.is_file():
            raise FileNotFoundError(f"teacher_checkpoint {path} does not exist")
        return task_from_checkpoint(path)
    if architecture is None:
        if path.exists() or "/" in source:
            raise ValueError(
                f"teacher_checkpoint {source} is a weights file: set teacher_backbone to its architecture "
                f"(a timm model name such as regnety_160, or a lattn backbone name)"
            )
        if not timm.is_model(source):
            raise ValueError(f"teacher_checkpoint {source!r} is neither a file nor a timm model name")
        model = timm.create_model(source, pretrained=True, num_classes=num_classes)
        return NormalizedTeacher(model, model.pretrained_cfg.get("mean", mean), model.pretrained_cfg.get("std", std))
    if not path.is_file():
        raise FileNotFoundError(f"teacher_checkpoint {path} does not exist")
    if architecture in BACKBONES:
        model = build_classifier_backbone(architecture, {"pretrained": str(path)}, num_classes)
        return NormalizedTeacher(model, mean, std)
    if not timm.is_model(architecture):
        raise ValueError(f"teacher_backbone {architecture!r} is neither a lattn backbone nor a timm model name")
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    model.load_state_dict(read_state_dict(str(path)))
    return NormalizedTeacher(model, model.pretrained_cfg.get("mean", mean), model.pretrained_cfg.get("std", std))


def task_from_checkpoint(path: Path) -> nn.Module:
    """A ClassificationTask rebuilt from its .ckpt alone, with the weights it evaluates with.

    Those are the checkpoint's ``state_dict`` (the averaged weights of a run with
    :class:`~lattn_app.callbacks.LattnEMA`). Its own pretrained source and teacher are not reloaded.
    """
    from .classification import ClassificationTask

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    accepted = builder_options(ClassificationTask) or {}  # its own options and LattnTask's
    hparams = {key: value for key, value in (checkpoint.get("hyper_parameters") or {}).items() if key in accepted}
    options = dict(hparams.get("backbone_options") or {})
    options.pop("pretrained", None)
    hparams.update(backbone_options=options, teacher_checkpoint=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = ClassificationTask(**hparams)
    task.load_state_dict(checkpoint["state_dict"])
    return task
