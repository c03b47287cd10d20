"""What every lattn task shares: input normalisation, the optimiser recipe and the non-finite-loss guard.

Optimiser: AdamW (or SGD with momentum, ``optimizer: sgd``, the ResNet recipes) over parameter groups
without weight decay for biases, norms and the backbone's ``no_weight_decay()`` names; optionally
layer-wise learning-rate decay over the backbone's blocks (timm's ``param_groups_layer_decay``, driven by
the backbone's ``group_matcher``). Schedule: linear warm-up from 0 over ``warmup_epochs``, then cosine
decay to ``min_lr_ratio * lr`` or, with ``lr_milestones``, tenfold drops at those epochs (the "1x" step
schedule of Mask R-CNN); stepped every optimiser step.

A training loss that is NaN or infinite stops the run with an error naming the step
(``on_nonfinite_loss="error"``, the default; the last saved checkpoint stays as it was) or skips that
optimiser step (``"skip"``, counted in the ``train_skipped_steps`` log).

Checkpoints: every checkpoint records the task, the ``lattn fit`` config and the random generators'
state (:mod:`lattn_app.tasks.record`). Loading one into a task it does not fit (another task, backbone
or attention mechanism, or weights of other shapes) raises a ValueError that says what differs, both in
``lattn validate/test/predict --ckpt_path`` and in ``Task.load_from_checkpoint``. A resumed run
(``lattn fit --ckpt_path last``) restores the random generators when training starts again.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn

from .. import __version__
from ..registry import BACKBONES, check_choice
from .record import (
    checkpoint_mismatch,
    collect_rng_states,
    read_checkpoint_header,
    restore_rng_states,
    task_name,
    trained_task_name,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_options_with_attention(backbone: str, backbone_options: dict[str, Any] | None, attention: str | None,
                                    attention_options: dict[str, Any] | None) -> dict[str, Any]:
    """The backbone's options with the task's attention mechanism and its options filled in.

    Every task takes the mechanism as ``model.attention`` and its options as ``model.attention_options``
    (one YAML path in every task); they go to the backbone where it accepts them. Setting them inside
    ``backbone_options`` instead is refused, so that there is only one place to look.
    """
    options = dict(backbone_options or {})
    for name, value in (("attention", attention), ("attention_options", attention_options)):
        if name in options:
            raise ValueError(f"backbone_options.{name} is not read: set model.{name}: {options[name]} instead "
                             "(every task takes the attention mechanism and its options there)")
        if value is not None and BACKBONES.get(backbone).accepts(name):
            options[name] = value
    return options


log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


def check_milestones(milestones: Sequence[float] | None) -> list[float] | None:
    """`milestones` sorted, or a ValueError naming the option unless they are positive epoch numbers."""
    if milestones is None:
        return None
    if not milestones or not all(m > 0 for m in milestones):
        raise ValueError(f"lr_milestones must be positive epoch numbers, e.g. [8, 11]; got {list(milestones)}")
    return sorted(float(m) for m in milestones)


def warmup_step_decay(step: int, warmup_steps: int, milestone_steps: Sequence[float]) -> float:
    """Learning-rate factor at `step`: linear warm-up to 1, then divided by 10 at every milestone passed."""
    warmup = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    return warmup * 0.1 ** sum(step >= milestone for milestone in milestone_steps)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor at `step`: linear warm-up to 1, then cosine decay to `min_ratio`.

    Applied by torch's LambdaLR rather than SequentialLR(LinearLR, CosineAnnealingLR): CosineAnnealingLR's
    floor ``eta_min`` is one absolute rate for all parameter groups, so under layer-wise decay (0.75 over
    12 blocks: the first block's rate is 0.03 lr) a floor of 0.01 lr would end that group at 3x the
    rate it starts with, where this factor ends every group at `min_ratio` of its own rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LattnTask(LightningModule):
    """Base LightningModule of the lattn tasks: the training options every task shares, declared here once.

    Subclasses declare only their own arguments and pass ``**kwargs`` on to ``super().__init__`` (the
    command line follows them here, so ``--help`` lists these options under each task and checks their
    names). They set ``self.backbone``, implement :meth:`training_loss`, and may implement
    :meth:`summary_line` (printed once at the end of ``fit``) and :meth:`fill_from_data`.

    Args:
        lr: peak learning rate (after warm-up).
        weight_decay: weight decay (not applied to biases, norms and the backbone's
            ``no_weight_decay()`` parameters); AdamW's decoupled decay, or SGD's L2 term.
        warmup_epochs: linear warm-up from 0, in epochs (fractions allowed).
        min_lr_ratio: the cosine decay ends at this fraction of each group's rate.
        optimizer: ``adamw`` (default) or ``sgd`` (with ``momentum``).
        momentum: SGD's momentum (``optimizer: sgd`` only).
        lr_milestones: epochs (fractions allowed) at which the learning rate drops tenfold, after the
            warm-up, instead of the cosine decay (e.g. [8, 11] of 12 epochs: Mask R-CNN's 1x schedule).
        compile: compile the task's network with ``torch.compile`` (in place: parameter names and
            checkpoints stay the same) for training and evaluation; the first steps then take longer
            while it compiles. The network is :attr:`compiled_part` (detection: the backbone and FPN,
            whose shapes torch.compile handles; the detector's heads stay eager). No registered mechanism
            breaks the graph (``lattn bench compile`` counts the breaks and measures the speed).
        compile_options: keyword arguments of ``torch.compile`` with `compile` (e.g. ``{mode: max-autotune}``
            on a GPU, ``{backend: aot_eager}`` to check tracing without code generation); None: its defaults.
        layer_decay: layer-wise learning-rate decay over the backbone's blocks (e.g. 0.75); None: off.
        freeze_backbone: train only the heads (the backbone's batch-norm statistics stay frozen too).
        mean: per-channel mean the [0, 1] input images are normalised with.
        std: per-channel standard deviation of that normalisation.
        on_nonfinite_loss: ``error`` stops at a NaN/inf training loss (the last checkpoint is kept);
            ``skip`` skips that optimiser step and counts it.
    """

    backbone: nn.Module

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.01,
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_nonfinite_loss: Literal["error", "skip"] = "error",
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.9,
        lr_milestones: Sequence[float] | None = None,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_choice("on_nonfinite_loss", on_nonfinite_loss, ("error", "skip"))
        check_choice("optimizer", optimizer, OPTIMIZERS)
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.lr_milestones = check_milestones(lr_milestones)
        self.compile_network = compile  # not self.compile: that is nn.Module's method
        self.compile_options = dict(compile_options or {})
        # Compiled: the modules whose per-pass bookkeeping runs before each training step (performer's redraw count).
        self.counted_outside_graph: list[nn.Module] = []
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] (e.g. 0.75) or null; got {layer_decay}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.min_lr_ratio = min_lr_ratio
        self.layer_decay = layer_decay
        self.freeze_backbone = freeze_backbone
        self.on_nonfinite_loss = on_nonfinite_loss
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.skipped_steps = 0
        # The resolved `lattn fit` config (YAML text) and its --config files; the CLI sets them.
        self.training_config: str | None = None
        self.training_config_files: list[str] = []
        self._rng_states_to_restore: dict[str, Any] | None = None

    def normalize(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (what the datamodules give) -> normalised network input."""
        return (images - self.mean) / self.std

    # --- training ---------------------------------------------------------------------------------
    def training_loss(self, batch: Any) -> Tensor:
        """The loss of one training batch (subclasses also log their training metrics here)."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        for module in self.counted_outside_graph:  # what a compiled graph cannot do itself
            if module.training:
                module.count_training_pass()
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            if self.on_nonfinite_loss == "skip":
                self.skipped_steps += 1
                self.log("train_skipped_steps", float(self.skipped_steps))
                return None  # Lightning skips the backward pass and the optimiser step
            raise FloatingPointError(
                f"the training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); training stopped and the last saved checkpoint is kept. Lower model.lr, "
                f"use bf16-mixed instead of 16-mixed, or set model.on_nonfinite_loss: skip"
            )
        self.log("train_loss", loss, prog_bar=True, batch_size=self.batch_size_of(batch))
        return loss

    def batch_size_of(self, batch: Any) -> int | None:
        """Samples in `batch`, for epoch averages of logged values; None: Lightning finds it (first tensor's length)."""
        return None

    # --- checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the task, its config and the random generators' state (``checkpoint["lattn"]``)."""
        checkpoint["lattn"] = {
            "task": task_name(type(self)),
            "config": self.training_config,
            "config_files": list(self.training_config_files),
            "rng_states": collect_rng_states(),
            "skipped_steps": self.skipped_steps,
            "lattn_version": __version__,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another task or architecture (before Lightning loads its weights)."""
        problem = checkpoint_mismatch(checkpoint, type(self), self.hparams, self.state_dict())
        if problem is not None:
            try:  # attached to a Trainer (lattn validate/test/predict --ckpt_path), or Task.load_from_checkpoint
                path = self.trainer.ckpt_path
            except RuntimeError:
                path = None
            raise ValueError(f"{path or 'checkpoint'}: {problem}")
        record = checkpoint.get("lattn") or {}
        self.skipped_steps = record.get("skipped_steps", 0)
        self._rng_states_to_restore = record.get("rng_states")

    def on_train_start(self) -> None:
        self._fill_unset_from_data()
        # A resumed run continues the random sequence of the run that wrote the checkpoint. Restored here,
        # not at loading: the sanity check and the data loaders' setup in between use random numbers.
        if self._rng_states_to_restore is not None:
            restore_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = None, **kwargs: Any) -> LattnTask:
        """Lightning's ``load_from_checkpoint``, after checking that the checkpoint was trained as this task.

        A checkpoint of another task would otherwise build this task from that task's hyperparameters
        and fail somewhere unrelated; the error says which task and architecture the checkpoint has.
        """
        if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file():
            # Memory-mapped: only the small records are read here, not the weights.
            header = read_checkpoint_header(checkpoint_path, True if weights_only is None else weights_only)
            trained_as = trained_task_name(header) or task_name(cls)
            problem = checkpoint_mismatch(header, cls, {**(header.get("hyper_parameters") or {}), **kwargs},
                                          loader=f"{cls.__name__}.load_from_checkpoint",
                                          advice=f"Load it with {trained_as}.load_from_checkpoint, without "
                                                 "overriding its architecture")
            if problem is not None:
                raise ValueError(f"{checkpoint_path}: {problem}")
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)

    def fill_from_data(self, datamodule: Any) -> dict[str, Any]:
        """Set the arguments left unset (None) that the data determines; return them by name.

        Called by the CLI before training (so that the saved config records the values) and when a
        stage starts, after a checkpoint is loaded: a task loaded from a checkpoint has the checkpoint's
        values by then (its ``on_load_checkpoint``), and only what is still unset is taken from the data.
        """
        return {}

    def _fill_unset_from_data(self) -> None:
        self.fill_from_data(getattr(self.trainer, "datamodule", None))

    # Lightning loads a --ckpt_path checkpoint after setup() and on_fit_start, and before these hooks (the
    # validation one also runs for fit's sanity check; on_train_start fills too, below).
    def on_validation_start(self) -> None:
        self._fill_unset_from_data()

    def on_test_start(self) -> None:
        self._fill_unset_from_data()

    def on_predict_start(self) -> None:
        self._fill_unset_from_data()

    #: Dotted attribute path of the module ``compile=True`` compiles (each task names its network).
    compiled_part: str = "backbone"

    def setup(self, stage: str) -> None:
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        if self.compile_network:
            network = operator.attrgetter(self.compiled_part)(self)
            if getattr(network, "_compiled_call_impl", None) is None:  # setup runs once per stage
                network.compile(**self.compile_options)
                self.counted_outside_graph = [m for m in self.modules() if hasattr(m, "count_training_pass")]
                log.info("torch.compile: %s (%s) is compiled when it first runs", self.compiled_part,
                         type(network).__name__)

    # --- reporting ----------------------------------------------------------------------------------
    def summary_line(self) -> str | None:
        """The end-of-training summary (e.g. the validation metric next to its baseline); None: nothing."""
        return None

    @rank_zero_only
    def on_fit_end(self) -> None:
        line = self.summary_line()
        if line is None:
            return
        checkpoint = self.trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "best_model_path", "") and checkpoint.best_model_score is not None:
            line += f"\nBest checkpoint: {checkpoint.best_model_path} ({checkpoint.monitor} {float(checkpoint.best_model_score):.3f})"
        print(line, flush=True)

    def on_train_epoch_start(self) -> None:
        if self.freeze_backbone:
            self.backbone.eval()  # frozen means frozen batch-norm statistics too

    # --- optimisation -------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decay / no decay, with per-group lr scales under layer-wise decay."""
        skip = set(getattr(self.backbone, "no_weight_decay", lambda: set())())
        if self.layer_decay is None or self.freeze_backbone:
            groups = param_groups_weight_decay(self, self.weight_decay, no_weight_decay_list=[f"backbone.{n}" for n in skip])
        else:
            if not hasattr(self.backbone, "group_matcher"):
                raise ValueError(f"layer_decay needs a backbone with group_matcher(); {type(self.backbone).__name__} has none")
            groups = param_groups_layer_decay(self.backbone, self.weight_decay, no_weight_decay_list=skip,
                                              layer_decay=self.layer_decay)
            in_backbone = {id(p) for p in self.backbone.parameters()}
            heads = nn.ParameterList(p for p in self.parameters() if id(p) not in in_backbone)
            groups += param_groups_weight_decay(heads, self.weight_decay)
        trainable = []
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
            if group["params"]:
                group["lr"] = self.lr * group.pop("lr_scale", 1.0)
                trainable.append(group)
        return trainable

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser over :meth:`parameter_groups` (``optimizer``: adamw or sgd)."""
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameter_groups(), lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        return torch.optim.AdamW(self.parameter_groups(), lr=self.lr, weight_decay=self.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        steps_per_epoch = total_steps / max_epochs
        warmup_steps = int(round(self.warmup_epochs * steps_per_epoch))
        if self.lr_milestones is None:
            def factor(step: int) -> float:
                return warmup_cosine(step, warmup_steps, total_steps, self.min_lr_ratio)
        else:
            milestone_steps = [m * steps_per_epoch for m in self.lr_milestones]

            def factor(step: int) -> float:
                return warmup_step_decay(step, warmup_steps, milestone_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
