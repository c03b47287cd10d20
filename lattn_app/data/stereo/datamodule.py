"""What every stereo datamodule shares: augmentation, the held-out validation sequences, limits, predict pairs.

A dataset layout (Scene Flow, and the real benchmarks after it) subclasses :class:`StereoDataModule`
and writes only how its frames are found: :meth:`~StereoDataModule.training_frames` (every training
frame, with the sequence it belongs to) and :meth:`~StereoDataModule.test_frames`. Validation (the
checkpoint selection) is a held-out fraction of the training *sequences*, never the test split.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict

import numpy as np

from ..base import LattnDataModule, warn_rank_zero
from .augmentation import StereoAugmentation
from .dataset import StereoDataset, stereo_collate
from .files import StereoSample, find_predict_pairs

log = logging.getLogger(__name__)

__all__ = ["StereoDataModule"]


class StereoDataModule(LattnDataModule):
    """Base of the stereo datamodules: samples as described in :mod:`lattn_app.data.stereo.dataset`.

    Training samples are augmented by :class:`StereoAugmentation`; validation and test samples are the
    full images as stored.

    Args:
        crop_size: training crop (height, width) in pixels, clipped to the image when larger; None
            trains on full images. Validation and test always use full images.
        val_fraction: fraction of the training sequences (of each subset) held out for validation (at
            least one sequence when > 0 and there are two or more). 0: no validation.
        val_seed: seed of the choice of validation sequences (the split is the same on every run).
        limit_train: use only the first N training frames (quick runs); None: all.
        limit_val: use only the first N validation frames; None: all.
        limit_test: use only the first N test frames; None: all.
        predict_pairs: for ``lattn predict``: a folder with ``left/`` and ``right/`` sub-folders of
            same-named images, or a list of [left_image, right_image] paths. Images may have any size.
        brightness: training colour jitter: brightness factor range [1 - b, 1 + b].
        contrast: training colour jitter: contrast factor range [1 - c, 1 + c].
        saturation: training colour jitter: saturation factor range [1 - s, 1 + s].
        hue: training colour jitter: hue shift range [-h, h] (fraction of the hue circle, <= 0.5).
        gamma: training gamma range (min, max); None: no gamma change.
        asymmetric_color: draw the colour jitter separately for the two views (True) or once (False).
        flip_prob: probability of the horizontal flip that swaps the views (needs right-view
            disparities). 0 (default): off.
        rescale: training rescale range (min, max) of scale factors, disparities scaled with the
            width; None (default): off.
        **kwargs: ``root``, ``batch_size``, ``eval_batch_size``, ``num_workers`` (:class:`LattnDataModule`).
    """

    collate_fn = staticmethod(stereo_collate)

    def __init__(
        self,
        # StereoAugmentation's options again, on purpose: each is a --data.* option with its own help.
        crop_size: tuple[int, int] | None = (256, 512),
        val_fraction: float = 0.05,
        val_seed: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        predict_pairs: str | list[list[str]] | None = None,
        brightness: float = 0.3,
        contrast: float = 0.3,
        saturation: float = 0.2,
        hue: float = 0.05,
        gamma: tuple[float, float] | None = (0.8, 1.2),
        asymmetric_color: bool = True,
        flip_prob: float = 0.0,
        rescale: tuple[float, float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{owner}: val_fraction must be in [0, 1); got {val_fraction!r}")
        for name, value in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if value is not None and value < 1:
                raise ValueError(f"{owner}: {name} must be a positive number of frames or None; got {value!r}")
        self.val_fraction = val_fraction
        self.val_seed = val_seed
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.predict_pairs = predict_pairs
        self.train_transform = StereoAugmentation(
            crop_size=crop_size, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
            gamma=gamma, asymmetric_color=asymmetric_color, flip_prob=flip_prob, rescale=rescale,
        )

    @property
    def disparity_range(self) -> int | None:
        """The largest disparity (pixels) this data holds, where the data knows it; None: unknown.

        A stereo model whose ``max_disparity`` is not set takes it from here (see
        :class:`~lattn_app.tasks.stereo.StereoTask`).
        """
        return None

    # ------------------------------------------------------------------------- what a layout provides

    def training_frames(self, need_right_disparity: bool) -> list[StereoSample]:
        """Every training frame (validation is held out of these by sequence)."""
        raise NotImplementedError

    def test_frames(self) -> list[StereoSample]:
        """The frames of the held-out test split."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ the splits

    def split_train_val(self, samples: list[StereoSample]) -> tuple[list[StereoSample], list[StereoSample]]:
        """Hold out `val_fraction` of the sequences of each subset (the first part of a sequence's name).

        Frames of one sequence are near-duplicates, so whole sequences are held out; the choice is
        seeded by `val_seed` and the subset's name, so it is the same on every run.
        """
        by_subset: dict[str, list[str]] = defaultdict(list)
        for sequence in sorted({s.sequence for s in samples}):
            by_subset[sequence.split("/")[0]].append(sequence)
        held_out: set[str] = set()
        counts = {subset: round(self.val_fraction * len(sequences)) for subset, sequences in by_subset.items()}
        if self.val_fraction > 0 and not any(counts.values()):
            largest = max(by_subset, key=lambda subset: len(by_subset[subset]))
            if len(by_subset[largest]) >= 2:
                counts[largest] = 1
        for subset, sequences in by_subset.items():
            rng = np.random.default_rng([self.val_seed, zlib.crc32(subset.encode())])
            order = rng.permutation(len(sequences))
            held_out.update(sequences[i] for i in order[: counts[subset]])
        if self.val_fraction > 0 and not held_out:
            warn_rank_zero("%s: only one training sequence; no validation set is held out", type(self).__name__)
        train = [s for s in samples if s.sequence not in held_out]
        val = [s for s in samples if s.sequence in held_out]
        log.info("%s split: %d training frames, %d validation frames (%d held-out sequences)",
                 type(self).__name__, len(train), len(val), len(held_out))
        return train, val

    def _limit(self, samples: list[StereoSample], split: str) -> list[StereoSample]:
        limit = self.limits[split]
        return samples if limit is None else samples[:limit]

    def setup(self, stage: str | None = None) -> None:
        """Find the files of the datasets `stage` needs ("fit", "validate", "test", "predict", None: all)."""
        if stage != "predict":
            _ = self.dataset_root  # resolve the root first (generates and announces the embedded set)
        if stage in (None, "fit", "validate") and "val" not in self.datasets:
            flip = self.train_transform.flip_prob > 0
            train, val = self.split_train_val(self.training_frames(need_right_disparity=flip))
            self.datasets["train"] = StereoDataset(self._limit(train, "train"), self.train_transform,
                                                   use_right_disparity=flip)
            self.datasets["val"] = StereoDataset(self._limit(val, "val"))
        if stage in (None, "test") and "test" not in self.datasets:
            self.datasets["test"] = StereoDataset(self._limit(self.test_frames(), "test"))
        if stage in (None, "predict") and "predict" not in self.datasets:
            if self.predict_pairs is not None:
                self.datasets["predict"] = StereoDataset(find_predict_pairs(self.predict_pairs))
            elif stage == "predict":
                raise ValueError(f"{type(self).__name__}: nothing to predict; pass --data.predict_pairs FOLDER (with "
                                 "left/ and right/ sub-folders) or a list of [left, right] image paths")
        log.info("%s datasets after setup(%s): %s", type(self).__name__, stage,
                 {split: len(dataset) for split, dataset in self.datasets.items()})
