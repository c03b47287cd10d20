"""Checkpoints that survive a killed run: :class:`LattnCheckpoint` and :class:`AtomicCheckpointIO`.

What Lightning 2.6 gives, and why it is not enough:

- ``ModelCheckpoint(save_last=True, monitor=...)`` writes ``last.ckpt`` only when it also writes a best
  checkpoint (or at the very end): once the monitored metric stops improving, ``last.ckpt`` stays old.
  With ``every_n_train_steps`` and a validation metric it also waits for the next validation.
- Its default writer (``TorchCheckpointIO`` through ``_atomic_save``) writes to a temporary file in the
  system temp folder and then moves it over the checkpoint. When that folder is on another file system
  (``/tmp`` on tmpfs or a local disk, checkpoints on a network file system) the move is a copy into the
  checkpoint itself, so a kill during it leaves a truncated checkpoint; nothing is fsynced.

:class:`LattnCheckpoint` is a ModelCheckpoint (``--ckpt_path last`` finds its ``last.ckpt``) that writes
``last.ckpt`` every ``last_every_n_steps`` optimiser steps and at the end of every epoch, never writes
weights that are NaN or infinite, and writes every checkpoint through :class:`AtomicCheckpointIO`
(temporary file in the checkpoint's folder, fsync, rename over the old file, fsync of the folder).

:class:`LattnEMA` is Lightning's ``EMAWeightAveraging`` (an exponential moving average of the weights
for any task, set in ``trainer.callbacks``), with the two fixes it needs here (see the class).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointIO", "LattnCheckpoint", "LattnEMA", "write_atomically"]

PARTIAL_SUFFIX = ".partial"  # a checkpoint being written: ".<name>.<random>.partial" next to it


def write_atomically(path: str | os.PathLike, write: Any, overwrite: bool = True) -> None:
    """Write a file so that it is either the old file or the complete new one, even after a kill or a crash.

    `write(file)` writes the content to a binary file object: a temporary file in the same folder, which
    is flushed to disk and then renamed over `path` (an atomic step on POSIX and Windows). With
    ``overwrite=False`` it is linked to `path` instead, which fails (FileExistsError) if `path` exists,
    even one that appeared while writing: an existing file is never replaced unasked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(partial, path)
        else:
            os.link(partial, path)
            partial.unlink()
    except BaseException as error:
        partial.unlink(missing_ok=True)
        cause = _os_error_in(error)
        if cause is not None:  # e.g. a full disk, which torch.save reports as "unexpected pos ..."
            raise OSError(cause.errno, f"could not write {path}: {cause.strerror}; the previous file is kept") from error
        raise
    if os.name == "posix":  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _os_error_in(error: BaseException) -> OSError | None:
    """The operating system's error (with an errno) behind `error`, following its chained causes."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


def is_local_path(path: str | os.PathLike) -> bool:
    """A path on this machine's file system (not a URL such as ``s3://bucket/run``)."""
    return "://" not in str(path) or str(path).startswith("file://")


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed writes left in `folder` (``.*.partial`` files); returns the deleted paths."""
    folder = Path(folder)
    leftovers = sorted(folder.glob(f".*{PARTIAL_SUFFIX}")) if folder.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but atomic and durable on local paths (see :func:`write_atomically`).

    The file format is unchanged (``torch.save``); remote paths (``s3://`` ...) use Lightning's writer.
    ``trainer.plugins: [AtomicCheckpointIO]`` selects it by hand; :class:`LattnCheckpoint` does it for you.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(path, lambda file: torch.save(checkpoint, file))


class LattnCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for the best checkpoints, plus a ``last.ckpt`` that is always recent and valid.

    - The best ``save_top_k`` checkpoints by `monitor` are kept exactly as by ModelCheckpoint (all its
      arguments apply, e.g. ``filename: best``, ``monitor: val_epe``, ``mode: min``).
    - ``<dirpath>/last.ckpt`` is written every `last_every_n_steps` optimiser steps and at the end of every
      training epoch (after its validation), overwriting the previous one; ``lattn fit --ckpt_path last``
      resumes from it, losing at most `last_every_n_steps` steps.
    - Every checkpoint is written atomically: the trainer's default ``TorchCheckpointIO`` is replaced by
      :class:`AtomicCheckpointIO` (a custom CheckpointIO is kept, with a warning). A kill during a write
      leaves the previous file intact; its partial file is removed when the next run starts.
    - Weights that are no longer finite are never written: the run stops with a ``FloatingPointError``
      naming the step, and the checkpoints written before stay as they were.

    - Before training starts, the folder is checked: it must be writable, and a new run (not resuming)
      refuses to overwrite an earlier run's checkpoints there unless `overwrite` is set.

    Args:
        last_every_n_steps: optimiser steps between two writes of ``last.ckpt``; None or 0: only at epoch ends.
        save_last: write ``last.ckpt`` at all.
        overwrite: let a new run replace the checkpoints an earlier run left in the folder
            (``lattn fit --overwrite true`` sets it).
        args, kwargs: the arguments of :class:`~lightning.pytorch.callbacks.ModelCheckpoint` for the best
            checkpoints (its own ``save_last`` is replaced by the one above).
    """

    def __init__(self, *args: Any, last_every_n_steps: int | None = 500, save_last: bool = True,
                 overwrite: bool = False, **kwargs: Any) -> None:
        if last_every_n_steps is not None and last_every_n_steps < 0:
            raise ValueError(f"LattnCheckpoint: last_every_n_steps must be >= 0 or null; got {last_every_n_steps}")
        super().__init__(*args, save_last=False, **kwargs)  # last.ckpt is written here, not by ModelCheckpoint
        self.overwrite = overwrite
        self.keep_last = save_last
        self.last_every_n_steps = last_every_n_steps or 0
        self._last_written_step: int | None = None

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        io = trainer.strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:  # Lightning's default writer: same format, but not atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        elif not isinstance(io, AtomicCheckpointIO):
            rank_zero_warn(f"LattnCheckpoint: the trainer writes checkpoints with {type(io).__name__}, not "
                           "AtomicCheckpointIO; a kill during a write may leave a broken checkpoint")
        if stage == "fit" and trainer.is_global_zero and is_local_path(self.dirpath):
            for path in remove_partial_files(self.dirpath):
                log.info("Removed %s, the partial write of a checkpoint by a killed run", path)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_written_step = trainer.global_step  # a resumed run has this step on disk already
        if trainer.is_global_zero and not trainer.fast_dev_run and is_local_path(self.dirpath):
            # Here, not in setup(): Lightning knows whether the run resumes (trainer.ckpt_path) only by now.
            self.check_folder(resuming=trainer.ckpt_path is not None)

    def check_folder(self, resuming: bool) -> None:
        """Before training: the folder must be writable, and a new run must not replace an earlier run's files."""
        folder = Path(self.dirpath)
        earlier = sorted(path.name for path in folder.glob("*" + self.FILE_EXTENSION)) if folder.is_dir() else []
        if earlier and not resuming and not self.overwrite:
            raise FileExistsError(
                f"{folder} holds the checkpoints of an earlier run ({', '.join(earlier[:4])}); this new run would "
                "overwrite them. Resume that run with --ckpt_path last, train into another folder (another "
                "config name, or its checkpoint dirpath), or pass --overwrite true to replace them"
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-check-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise PermissionError(f"checkpoint folder {folder} is not writable ({error.strerror or error}); "
                                  "training has not started. Choose a writable folder (its checkpoint dirpath)") from None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        due = self.last_every_n_steps and step % self.last_every_n_steps == 0 and step != self._last_written_step
        # The epoch's last batch is written at the epoch end, after validation: not twice.
        if due and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.save_last_checkpoint(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.save_last_checkpoint(trainer, pl_module)

    def save_last_checkpoint(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write ``last.ckpt`` now (on every rank: saving is collective; rank 0 writes the file)."""
        if not self.keep_last or not self._writing(trainer):
            return
        self.check_weights_are_finite(trainer, pl_module)
        self.last_model_path = self.last_path  # set first: it is part of the state being saved
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self._last_written_step = trainer.global_step

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # ModelCheckpoint writes its best (top-k) checkpoints through here.
        self.check_weights_are_finite(trainer, trainer.lightning_module)
        super()._save_checkpoint(trainer, filepath)

    def check_weights_are_finite(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Raise FloatingPointError, before anything is written, if a weight or buffer is NaN or infinite."""
        tensors = {name: t for name, t in pl_module.state_dict().items() if torch.is_floating_point(t)}
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()])  # one device sync, not one per tensor
        if bool(finite.all()):
            return
        bad = [name for name, ok in zip(tensors, finite.tolist()) if not ok]
        kept = (f"{self.last_path} still holds step {self._last_written_step}"
                if self._last_written_step else "the checkpoints written before stay as they are")
        raise FloatingPointError(
            f"the model weights are not finite at global step {trainer.global_step} (epoch {trainer.current_epoch}; "
            f"{len(bad)} tensors, e.g. {', '.join(bad[:3])}): a finite loss had a NaN or infinite gradient. Training "
            f"stopped without writing a checkpoint; {kept}. Lower model.lr or clip gradients "
            f"(--trainer.gradient_clip_val 1.0), then resume with --ckpt_path last"
        )

    def _writing(self, trainer: Trainer) -> bool:
        """Whether checkpoints are written now (as ModelCheckpoint: only while fitting, not in sanity checks)."""
        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING)


class LattnEMA(EMAWeightAveraging):
    """An exponential moving average of the weights (Lightning's ``EMAWeightAveraging``), for any lattn task.

    ``ema = decay * ema + (1 - decay) * weights`` after every optimiser step. Validation during ``fit``
    runs on the averaged weights, and every checkpoint holds them as its ``state_dict`` (the online
    weights go under ``current_model_state``), so ``validate``, ``test``, ``predict``, ``pretrained=``
    and a distillation teacher all use the averaged weights; ``fit --ckpt_path`` resumes both. At the
    end of ``fit`` the model is left with the averaged weights. In YAML::

        trainer:
          callbacks:
            - class_path: LattnEMA
              init_args: {decay: 0.9998}

    Args:
        decay: weight of the old average at each update, in (0, 1) (e.g. 0.9998).
        kwargs: the other arguments of ``EMAWeightAveraging`` (``update_every_n_steps``,
            ``update_starting_at_step``, ``device``: where the average is kept, default the model's).
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"LattnEMA: decay must be in (0, 1) (e.g. 0.9998); got {decay!r}")
        super().__init__(decay=decay, **kwargs)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning builds the average in setup(), before the strategy moves the model to its device: without
        # this it stays on the CPU and every step copies the weights there (ViT-S: 280 ms per update on 2 cores).
        if self._device is None and self._average_model is not None:
            self._average_model.to(pl_module.device)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Outside fit the checkpoint's state_dict already is the average; Lightning would warn to remove the callback.
        if self._average_model is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
