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
from typing import ClassVar, Literal

import numpy as np

from ..base import LattnDataModule, warn_rank_zero
from .augmentation import StereoAugmentation
from .calibration import StereoCalibration
from .dataset import StereoDataset, stereo_collate
from .files import StereoSample, find_predict_pairs

log = logging.getLogger(__name__)

__all__ = ["StereoDataModule"]


class StereoDataModule(LattnDataModule):
    """Base of the stereo datamodules: samples as described in :mod:`lattn_app.data.stereo.dataset`.

    Training samples are augmented by :class:`StereoAugmentation`; validation and test samples are the
    full images as stored.

    Args:
        crop_size: training crop (height, width) in pixels, clipped to the image when larger; ``"whole"``
            trains on whole images. None (default): the layout's :attr:`default_crop_size` (PSMNet's
            256 x 512), or whole images on the embedded synthetic set; the choice is logged. Validation and
            test always use whole images.
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
        disparity_bound: the largest disparity (pixels) the evaluated or predicted pairs may hold, where
            their files do not say (calib.txt's ``ndisp`` does). A model whose ``max_disparity`` is smaller
            evaluates such pairs at a reduced scale (:class:`~lattn_app.tasks.stereo.StereoTask`). None:
            not known.
        focal_length: focal length (pixels) of pairs without a calibration file of their own (e.g.
            ``predict_pairs``); with `baseline`, predictions also get metric depth and a point cloud.
        baseline: baseline of those pairs; depth comes out in its unit.
        predict_split: predict the layout's own pairs instead of `predict_pairs`: ``"testing"`` (the
            benchmark's test images, e.g. for a submission) or ``"training"``. Layouts without such
            folders (Scene Flow) refuse it.
        **kwargs: ``root``, ``batch_size``, ``eval_batch_size``, ``num_workers`` (:class:`LattnDataModule`).
    """

    collate_fn = staticmethod(stereo_collate)
    #: the benchmark's own metrics that `lattn test` reports besides EPE and bad-1/2/3
    #: (names of :data:`lattn_app.metrics.stereo.BENCHMARK_METRICS`); empty: none
    benchmark_metrics: ClassVar[tuple[str, ...]] = ()
    #: score every pixel with ground truth, as the benchmark does (True), or only those inside the model's
    #: range, as the Scene Flow literature does (False)
    score_all_ground_truth: ClassVar[bool] = False
    #: the benchmark's name in the zero-shot table and the logs
    benchmark_name: ClassVar[str] = "Scene Flow"
    #: the training crop (height, width) when `crop_size` is unset, on real data
    default_crop_size: ClassVar[tuple[int, int]] = (256, 512)

    def __init__(
        self,
        # StereoAugmentation's options again, on purpose: each is a --data.* option with its own help.
        crop_size: tuple[int, int] | Literal["whole"] | None = None,
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
        disparity_bound: float | None = None,
        focal_length: float | None = None,
        baseline: float | None = None,
        predict_split: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"{owner}: val_fraction must be in [0, 1); got {val_fraction!r}")
        for name, value in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if value is not None and value < 1:
                raise ValueError(f"{owner}: {name} must be a positive number of frames or None; got {value!r}")
        if disparity_bound is not None and not disparity_bound > 0:
            raise ValueError(f"{owner}: disparity_bound must be a positive number of pixels or None; got "
                             f"{disparity_bound!r}")
        if (focal_length is None) != (baseline is None):
            raise ValueError(f"{owner}: focal_length and baseline go together (depth needs both); got "
                             f"focal_length={focal_length!r}, baseline={baseline!r}")
        if focal_length is not None and not (focal_length > 0 and baseline > 0):
            raise ValueError(f"{owner}: focal_length and baseline must be positive; got {focal_length!r}, {baseline!r}")
        if predict_split is not None and predict_split not in ("training", "testing"):
            raise ValueError(f"{owner}: predict_split must be 'training', 'testing' or None; got {predict_split!r}")
        self.disparity_bound = disparity_bound
        self.given_calibration = (StereoCalibration(float(focal_length), float(baseline))
                                  if focal_length is not None else None)
        self.predict_split = predict_split
        self.val_fraction = val_fraction
        self.val_seed = val_seed
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.predict_pairs = predict_pairs
        if isinstance(crop_size, str) and crop_size != "whole":
            raise ValueError(f"{owner}: crop_size must be (height, width), 'whole' or None; got {crop_size!r}")
        chosen = crop_size if crop_size is not None else "whole" if self.is_embedded else self.default_crop_size
        self.crop_choice = "whole images" if chosen == "whole" else f"{chosen[0]} x {chosen[1]} crops"
        if crop_size is None:
            self.crop_choice += " (crop_size unset: " + ("the embedded set" if self.is_embedded else "real data") + ")"
        self.train_transform = StereoAugmentation(
            crop_size=None if chosen == "whole" else chosen, brightness=brightness, contrast=contrast,
            saturation=saturation, hue=hue, gamma=gamma, asymmetric_color=asymmetric_color, flip_prob=flip_prob,
            rescale=rescale,
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

    def split_pairs(self, split: str) -> list[StereoSample]:
        """The pairs of the layout's own ``training`` or ``testing`` folder, without ground truth (predict_split)."""
        raise ValueError(f"{type(self).__name__}: predict_split is not supported by this layout; pass "
                         "--data.predict_pairs instead")

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
            log.info("%s training: %s", type(self).__name__, self.crop_choice)
            self.datasets["train"] = StereoDataset(self._limit(train, "train"), self.train_transform,
                                                   use_right_disparity=flip)
            self.datasets["val"] = self._evaluation_dataset(self._limit(val, "val"))
        if stage in (None, "test") and "test" not in self.datasets:
            self.datasets["test"] = self._evaluation_dataset(self._limit(self.test_frames(), "test"))
        if stage in (None, "predict") and "predict" not in self.datasets:
            if self.predict_split is not None:
                _ = self.dataset_root
                self.datasets["predict"] = self._evaluation_dataset(self.split_pairs(self.predict_split))
            elif self.predict_pairs is not None:
                self.datasets["predict"] = self._evaluation_dataset(find_predict_pairs(self.predict_pairs))
            elif stage == "predict":
                raise ValueError(f"{type(self).__name__}: nothing to predict; pass --data.predict_pairs FOLDER (with "
                                 "left/ and right/ sub-folders) or a list of [left, right] image paths")
        log.info("%s datasets after setup(%s): %s", type(self).__name__, stage,
                 {split: len(dataset) for split, dataset in self.datasets.items()})

    def _evaluation_dataset(self, samples: list[StereoSample]) -> StereoDataset:
        return StereoDataset(samples, disparity_bound=self.disparity_bound, calibration=self.given_calibration)
