"""The skeleton every lattn datamodule is built on: root or embedded set, loaders, seeding, checks.

A datamodule of a new dataset subclasses :class:`LattnDataModule` and writes only what is its own:
how to find the files of each split under ``dataset_root`` (its ``setup``), and, where it has one, how
to generate its embedded synthetic set (``build_embedded``). Everything else lives here, once:

- ``root=None`` selects the embedded synthetic set: it is generated once into the cache directory
  (``$LATTN_CACHE_DIR`` or ``~/.cache/lattn``) the first time it is needed, and the log says loudly
  that this is not real data. A given ``root`` must be an existing folder (the error names the layout
  the datamodule expects);
- the training loader is ordered and augmented by (seed, epoch, sample) and resumes mid-epoch
  (:mod:`lattn_app.data.resumable`: the one seeding scheme of lattn); evaluation loaders count every
  sample once under DDP;
- ``batch_size``, ``eval_batch_size`` and ``num_workers`` are checked here, and ``num_workers`` is
  lowered to the CPUs this process may use;
- datasets are kept in ``self.datasets`` by split name (``train``, ``val``, ``test``, ``predict``); a
  loader asked for a split that was not set up says which ``setup`` stage builds it, and an empty
  ``val`` split means "no validation".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from .resumable import ResumableDataModule

log = logging.getLogger(__name__)
warn_rank_zero = rank_zero_only(log.warning)  # logged once in distributed runs (global rank 0)

SPLIT_STAGES = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}
_TO_TENSOR = ToTensorV2()


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float32 (3, H, W) in [0, 1]: the image every lattn dataset gives (the model normalises)."""
    return _TO_TENSOR(image=np.ascontiguousarray(image))["image"].float().div_(255.0)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{owner}: {name} must be {kind}; got {value!r}")


class LattnDataModule(ResumableDataModule):
    """Base of the lattn datamodules (see the module docstring).

    Subclasses set :attr:`layout` (the folder layout a ``root`` must have, for error messages) and, if
    they have an embedded synthetic set, :attr:`embedded_description` and :meth:`build_embedded`.
    They may set :attr:`collate_fn` for their samples.

    Args:
        root: the dataset folder; None: the embedded synthetic set.
        batch_size: training batch size.
        eval_batch_size: validation, test and prediction batch size; None: `batch_size`.
        num_workers: data-loader worker processes (0: load in the main process); lowered to the
            available CPUs.
    """

    layout: ClassVar[str] = "the dataset's files"
    embedded_description: ClassVar[str | None] = None
    collate_fn: ClassVar[Callable[[list[Any]], Any] | None] = None

    def __init__(self, root: str | None = None, batch_size: int = 4, eval_batch_size: int | None = None,
                 num_workers: int = 2) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(owner, "batch_size", batch_size)
        if eval_batch_size is not None:
            check_positive_int(owner, "eval_batch_size", eval_batch_size)
        check_positive_int(owner, "num_workers", num_workers, minimum=0)
        if root is None and self.embedded_description is None:
            raise ValueError(f"{owner}: root is required (a folder with {self.layout}); this dataset has no "
                             "embedded synthetic set")
        cpus = available_cpus()
        if num_workers > cpus:
            log.info("%s: num_workers=%d lowered to the %d available CPUs", owner, num_workers, cpus)
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = min(num_workers, cpus)
        self.datasets: dict[str, Dataset] = {}
        self._dataset_root: Path | None = None

    # ------------------------------------------------------------------------------- where the data is

    @property
    def is_embedded(self) -> bool:
        """True when the embedded synthetic set is used (``root=None``)."""
        return self.root is None

    def build_embedded(self) -> Path:
        """Generate the embedded synthetic set once (into the cache) and return its folder."""
        raise NotImplementedError(f"{type(self).__name__} has no embedded synthetic set")

    @property
    def dataset_root(self) -> Path:
        """The folder read: `root`, or the embedded set's cache folder (generated and announced on first use)."""
        if self._dataset_root is None:
            if self.root is None:
                self._dataset_root = self.build_embedded()
                warn_rank_zero(
                    "%s: no data root given, so the EMBEDDED SYNTHETIC SET is used (%s, at %s), NOT real data: "
                    "numbers on it say nothing about accuracy on real images. Pass --data.root PATH (a folder "
                    "with %s) to use a real dataset.",
                    type(self).__name__, self.embedded_description, self._dataset_root, self.layout,
                )
            else:
                root = Path(self.root).expanduser()
                if not root.is_dir():
                    raise FileNotFoundError(f"{type(self).__name__}: root {root} does not exist or is not a folder; "
                                            f"expected a folder with {self.layout}")
                self._dataset_root = root
        return self._dataset_root

    def prepare_data(self) -> None:
        """Generate the embedded synthetic set once (Lightning calls this on one process) when no root is given."""
        if self.root is None:
            self.build_embedded()

    # ------------------------------------------------------------------------------------------ loaders

    def dataset(self, split: str) -> Dataset:
        """The dataset of `split`, set up by the ``setup`` stage that builds it."""
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: the {split} data is not set up; call "
                               f"setup({SPLIT_STAGES[split]!r}) first (the Trainer does this)")
        return self.datasets[split]

    def loader(self, split: str) -> DataLoader:
        """The loader of `split`: shuffled, seeded and resumable for ``train``; in order for the others."""
        dataset = self.dataset(split)
        options: dict[str, Any] = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                       pin_memory=torch.cuda.is_available(), collate_fn=type(self).collate_fn)
        if split == "train":
            # A last incomplete batch is dropped (a batch of one breaks BatchNorm), unless the whole
            # training set is smaller than a batch.
            return self.resumable_train_loader(dataset, self.batch_size,
                                               drop_last=len(dataset) >= self.batch_size, **options)
        return self.evaluation_loader(dataset, self.eval_batch_size, **options)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader | list:
        if "val" in self.datasets and len(self.datasets["val"]) == 0:
            return []  # no validation split (e.g. val_fraction=0)
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")
