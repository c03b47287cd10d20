"""Training data that a resumed run continues exactly where the stopped run left off.

Lightning restores the model, the optimiser, the scheduler and the loop counters from a checkpoint, but
a plain DataLoader starts the interrupted epoch again from its first batch, in a new random order, and
augmentations drawn from the global random generators come out differently. Three small pieces fix that:

- :class:`ResumableSampler` orders each epoch as a function of (seed, epoch) alone (it is torch's
  DistributedSampler, so under DDP it also picks this process's share) and gives every sample its own
  seed derived from (seed, epoch, index);
- :class:`SeededDataset` augments each sample with the global random generators (torch, numpy, random)
  and the dataset's own pipeline (its ``transform``, when that has ``set_random_seed`` as albumentations
  pipelines and :class:`~lattn_app.data.stereo.StereoAugmentation` do) set from that seed, and puts the
  global ones back afterwards: augmentation depends neither on the number of workers nor on what ran
  before. This is lattn's one seeding scheme: datasets need no worker seeding of their own;
- :class:`ResumableDataLoader` counts the batches of the epoch it has given out; after
  ``load_state_dict`` it starts that epoch after those batches, without loading them.

:func:`resumable_train_loader` puts them together. :class:`ResumableDataModule` carries the loader's
position through checkpoints: Lightning 2.6 saves a stateful training loader's state with the loop
state too, but only gives it back to a loader created after the loop state is restored, and every lattn
task creates its loader before that (``configure_optimizers`` asks for
``trainer.estimated_stepping_batches`` to size the learning-rate schedule). A datamodule's own state is
restored before, so the position travels through it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["ResumableDataLoader", "ResumableDataModule", "ResumableSampler", "SeededDataset", "SeededIndex",
           "resumable_train_loader"]


class SeededIndex(NamedTuple):
    """A dataset index with the seed of that sample's augmentation."""

    index: int
    seed: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch` of a run seeded with `seed` (a 32-bit integer)."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """Shuffles by (seed, epoch) like torch's DistributedSampler and yields :class:`SeededIndex` items.

    Lightning calls ``set_epoch`` at the start of every epoch, and leaves a DistributedSampler in place
    under DDP (``num_replicas`` and ``rank`` then say which share is this process's). ``start`` skips the
    first samples of this process's share; :class:`ResumableDataLoader` sets it when resuming mid-epoch.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[SeededIndex]:
        indices = list(super().__iter__())[self.start:]
        return iter([SeededIndex(index, sample_seed(self.seed, self.epoch, index)) for index in indices])


@contextmanager
def seeded_random_state(seed: int) -> Iterator[None]:
    """Run the body with torch's (CPU), numpy's and Python's global generators seeded by `seed`; restore them after."""
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would also reseed the GPUs
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class SeededDataset(Dataset):
    """Wraps a dataset so that ``dataset[SeededIndex(i, seed)]`` draws sample i's randomness from `seed` only.

    A plain integer index reads the wrapped dataset as it is.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SeededIndex | int) -> Any:
        if not isinstance(key, SeededIndex):
            return self.dataset[key]
        with seeded_random_state(key.seed):
            transform = getattr(self.dataset, "transform", None)
            if hasattr(transform, "set_random_seed"):  # pipelines with their own generator (albumentations)
                transform.set_random_seed(key.seed)
            return self.dataset[key.index]


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a :class:`ResumableSampler` whose position in the epoch goes into checkpoints.

    ``state_dict()`` is the epoch, the batches of it given out so far and the sampler's seed; after
    ``load_state_dict()`` the next iteration of that same epoch skips those batches (a checkpoint written
    at the end of an epoch resumes with the next epoch, from its start).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler) or self.batch_size is None:
            raise TypeError("ResumableDataLoader needs sampler=ResumableSampler(...) and a batch_size")
        self.epoch = 0
        self.batches_done = 0
        self._resume_at: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first batch, after Lightning's set_epoch for that epoch.
        sampler = self.sampler
        skip = 0
        if self._resume_at is not None and self._resume_at["epoch"] == sampler.epoch:
            skip = self._resume_at["batches_done"]
        self._resume_at = None
        sampler.start = skip * self.batch_size
        self.epoch, self.batches_done = sampler.epoch, skip
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.sampler.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.seed = state_dict["seed"]
        self._resume_at = {"epoch": state_dict["epoch"], "batches_done": state_dict["batches_done"]}


def resumable_train_loader(dataset: Dataset, batch_size: int, trainer: Any = None, seed: int | None = None,
                           **loader_options: Any) -> ResumableDataLoader:
    """The shuffled training loader of a datamodule, resumable mid-epoch (see the module docstring).

    Args:
        dataset: the training dataset (its samples are read through :class:`SeededDataset`).
        batch_size: samples per batch.
        trainer: the datamodule's trainer, if attached: under DDP each process gets its own share.
        seed: seed of the order and the augmentations; None: the run's seed (``seed_everything`` sets
            ``PL_GLOBAL_SEED``), else 0.
        loader_options: further DataLoader arguments (``num_workers``, ``drop_last``, ``collate_fn``, ...).
    """
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    share = getattr(trainer, "distributed_sampler_kwargs", None) or {"num_replicas": 1, "rank": 0}
    sampler = ResumableSampler(dataset, seed=seed, num_replicas=share["num_replicas"], rank=share["rank"])
    # Starting an epoch draws the workers' base seed from the loader's generator: a private one keeps
    # torch's global generator (dropout, mixup, ...) a function of the training steps alone.
    generator = torch.Generator().manual_seed(seed)
    return ResumableDataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, generator=generator,
                               **loader_options)


class ResumableDataModule(LightningDataModule):
    """A LightningDataModule whose training loader continues mid-epoch after ``lattn fit --ckpt_path ...``
    and whose evaluation loaders count every sample once under DDP.

    Subclasses build their training loader with :meth:`resumable_train_loader`; the loader's position goes
    into checkpoints as this datamodule's state (``checkpoint["<DataModuleClass>"]["train_loader"]``).
    They build their validation, test and predict loaders with :meth:`evaluation_loader`.
    """

    _train_loader: ResumableDataLoader | None = None
    _train_loader_to_resume: dict[str, int] | None = None

    def resumable_train_loader(self, dataset: Dataset, batch_size: int, **loader_options: Any) -> ResumableDataLoader:
        """:func:`resumable_train_loader` for this datamodule's trainer, at the checkpoint's position if resuming."""
        loader = resumable_train_loader(dataset, batch_size, self.trainer, **loader_options)
        if self._train_loader_to_resume is not None:
            loader.load_state_dict(self._train_loader_to_resume)
            self._train_loader_to_resume = None
        self._train_loader = loader
        return loader

    def evaluation_loader(self, dataset: Dataset, batch_size: int, **loader_options: Any) -> DataLoader:
        """A loader in dataset order that, under DDP, gives every sample to exactly one process.

        Lightning would otherwise put a DistributedSampler in, which pads the last process's share with
        repeated samples so that all get as many batches: those samples would count twice in the metrics.
        The shares here differ by at most one sample (evaluation has no gradient sync to keep in step).
        """
        share = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        sampler = None
        if share is not None and share["num_replicas"] > 1:
            if len(dataset) < share["num_replicas"]:
                raise ValueError(f"{type(self).__name__}: {len(dataset)} evaluation samples cannot be split over "
                                 f"{share['num_replicas']} processes (each needs at least one); use fewer devices")
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=share["num_replicas"], rank=share["rank"],
                                                   shuffle=False)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_options)

    def state_dict(self) -> dict[str, Any]:
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_loader_to_resume = state_dict.get("train_loader")
