"""The embedded synthetic stereo set, the Scene Flow datamodule and stereo-aware augmentation.

Tests write tiny data sets in the real Scene Flow layout into tmp_path (the generator's parameters make
the synthetic set small) and read them back through SceneFlowDataModule.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lattn_app.data import synthetic_stereo
from lattn_app.data.stereo import sceneflow
from lattn_app.data.io import read_image, read_pfm, write_pfm
from lattn_app.data.resumable import SeededDataset, SeededIndex
from lattn_app.data.stereo import (
    SceneFlowDataModule,
    StereoAugmentation,
    StereoDataset,
    find_predict_pairs,
    stereo_collate,
)
from lattn_app.data.synthetic_stereo import ensure_synthetic_sceneflow, render_sequence

TINY = dict(height=48, width=96, train_sequences=6, test_sequences=2, frames_per_sequence=3, min_disparity=2.0,
            max_disparity=24.0)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny synthetic set (sub-pixel disparities): 6 TRAIN and 2 TEST sequences of 3 frames."""
    return ensure_synthetic_sceneflow(tmp_path_factory.mktemp("cache"), **TINY)


@pytest.fixture(scope="module")
def integer_root(tmp_path_factory) -> Path:
    """A tiny synthetic set with integer, fronto-parallel disparities (exact pixel matches)."""
    return ensure_synthetic_sceneflow(tmp_path_factory.mktemp("cache_int"), **{**TINY, "train_sequences": 2,
                                                                              "test_sequences": 1}, subpixel=False)


def module(root, **kwargs) -> SceneFlowDataModule:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("val_fraction", 0.34)
    return SceneFlowDataModule(root=str(root), subsets=kwargs.pop("subsets", ["flyingthings3d"]), **kwargs)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def exact_matches(left, right, disparity_left, disparity_right):
    """For integer disparities: (pixels visible in both views, those whose colours agree exactly)."""
    height, width = disparity_left.shape
    ys, xs = np.mgrid[0:height, 0:width]
    x_right = xs - np.rint(disparity_left).astype(int)
    inside = x_right >= 0
    x_right = np.clip(x_right, 0, width - 1)
    visible = inside & (disparity_right[ys, x_right] == disparity_left)
    same = (left == right[ys, x_right]).all(axis=-1)
    return visible, same


# --------------------------------------------------------------------------------- synthetic set


def test_synthetic_layout_matches_scene_flow(tiny_root):
    things = tiny_root / "FlyingThings3D"
    assert (tiny_root / "README.txt").is_file()
    sequences = {"TRAIN": ["A/0000", "B/0000", "C/0000", "A/0001", "B/0001", "C/0001"], "TEST": ["A/0000", "B/0000"]}
    for split, folders in sequences.items():
        assert sorted(p.relative_to(things / "frames_cleanpass" / split).as_posix()
                      for p in (things / "frames_cleanpass" / split).glob("*/*")) == sorted(folders)
        for folder in folders:
            for view in ("left", "right"):
                for frame in ("0006", "0007", "0008"):
                    for kind in ("frames_cleanpass", "frames_finalpass"):
                        image = read_image(things / kind / split / folder / view / f"{frame}.png")
                        assert image.shape == (48, 96, 3)
                    disparity = read_pfm(things / "disparity" / split / folder / view / f"{frame}.pfm")
                    assert disparity.shape == (48, 96)
                    assert 2.0 - 1e-4 <= disparity.min() and disparity.max() <= 24.0 + 1e-4
    assert len(list(things.rglob("*.png"))) == 8 * 3 * 2 * 2


def test_synthetic_generation_is_deterministic_and_cached(tmp_path, monkeypatch):
    parameters = {**TINY, "train_sequences": 2, "test_sequences": 1, "frames_per_sequence": 2}
    first = ensure_synthetic_sceneflow(tmp_path / "one", **parameters)
    second = ensure_synthetic_sceneflow(tmp_path / "two", **parameters)
    assert first.name == second.name and synthetic_stereo.SYNTHETIC_VERSION in first.name
    assert files_of(first) == files_of(second)  # byte-identical
    assert [p.name for p in (tmp_path / "one").iterdir()] == [first.name]  # no temporary folder left

    def fail(*args, **kwargs):
        raise AssertionError("the cached set was generated again")

    monkeypatch.setattr(synthetic_stereo, "generate_synthetic_sceneflow", fail)
    assert ensure_synthetic_sceneflow(tmp_path / "one", **parameters) == first
    # Another parameter set is another folder.
    monkeypatch.undo()
    other = ensure_synthetic_sceneflow(tmp_path / "one", **{**parameters, "seed": 1})
    assert other != first and files_of(other) != files_of(first)


def test_synthetic_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "env_cache"))
    root = ensure_synthetic_sceneflow(**{**TINY, "train_sequences": 1, "test_sequences": 0, "frames_per_sequence": 1})
    assert root.parent == tmp_path / "env_cache"


def test_concurrent_generations_do_not_disturb_each_other(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    parameters = {**TINY, "train_sequences": 2, "test_sequences": 1, "frames_per_sequence": 2}
    with ThreadPoolExecutor(3) as pool:
        roots = list(pool.map(lambda _: ensure_synthetic_sceneflow(tmp_path, **parameters), range(3)))
    assert roots[0] == roots[1] == roots[2] and (roots[0] / "README.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [roots[0].name]


def test_interrupted_generation_leaves_no_partial_set(tmp_path, monkeypatch):
    calls = []

    def broken_write(*args, **kwargs):
        calls.append(args)
        if len(calls) > 3:
            raise KeyboardInterrupt  # as if the process were stopped
        return write_pfm(*args, **kwargs)

    monkeypatch.setattr(synthetic_stereo, "write_pfm", broken_write)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_sceneflow(tmp_path, **{**TINY, "train_sequences": 2, "test_sequences": 0})
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary folder


def test_synthetic_geometry_is_exact_for_integer_disparities():
    for frame in render_sequence(3, height=64, width=128, frames=2, max_disparity=40.0, subpixel=False):
        assert np.array_equal(frame.disparity_left, np.rint(frame.disparity_left))
        visible, same = exact_matches(frame.left, frame.right, frame.disparity_left, frame.disparity_right)
        assert visible.mean() > 0.6
        assert same[visible].all()  # left(x) == right(x - d) wherever both views see the point
        assert (~visible).any()  # there are occlusions / out-of-view pixels
        # The right-view disparity maps right pixels back: right(x) == left(x + d).
        flipped = exact_matches(frame.right[:, ::-1], frame.left[:, ::-1], frame.disparity_right[:, ::-1],
                                frame.disparity_left[:, ::-1])
        assert flipped[1][flipped[0]].all()


def test_synthetic_files_match_exactly_for_integer_disparities(integer_root):
    things = integer_root / "FlyingThings3D"
    for frame in ("0006", "0008"):
        folder = "TRAIN/B/0000"
        left = read_image(things / "frames_cleanpass" / folder / "left" / f"{frame}.png")
        right = read_image(things / "frames_cleanpass" / folder / "right" / f"{frame}.png")
        disparity_left = read_pfm(things / "disparity" / folder / "left" / f"{frame}.pfm")
        disparity_right = read_pfm(things / "disparity" / folder / "right" / f"{frame}.pfm")
        visible, same = exact_matches(left, right, disparity_left, disparity_right)
        assert visible.mean() > 0.6 and same[visible].all()


def test_synthetic_subpixel_geometry_within_interpolation_tolerance():
    frame = render_sequence(5, height=64, width=128, frames=1, max_disparity=40.0)[0]
    height, width = frame.disparity_left.shape
    assert not np.allclose(frame.disparity_left, np.rint(frame.disparity_left))  # really sub-pixel
    ys, xs = np.mgrid[0:height, 0:width]

    def warp(shift):
        """The right image and right disparity linearly sampled at x - d - shift."""
        x_right = xs - frame.disparity_left - shift
        x0 = np.clip(np.floor(x_right).astype(int), 0, width - 2)
        weight = np.clip(x_right - x0, 0, 1)
        right = frame.right.astype(np.float64)
        image = (1 - weight)[..., None] * right[ys, x0] + weight[..., None] * right[ys, x0 + 1]
        disparity = (1 - weight) * frame.disparity_right[ys, x0] + weight * frame.disparity_right[ys, x0 + 1]
        return image, disparity, (x_right >= 0) & (x_right <= width - 1)

    image, disparity, inside = warp(0)
    visible = inside & (np.abs(disparity - frame.disparity_left) < 0.1)
    assert visible.mean() > 0.6
    error = np.abs(image - frame.left).mean(axis=-1)[visible].mean()
    wrong = np.abs(warp(2)[0] - frame.left).mean(axis=-1)[visible].mean()
    assert error < 3.0 and wrong > 5 * error  # matches at d, and unambiguously not 2 pixels away


# ------------------------------------------------------------------------------------- datamodule


def test_splits_are_disjoint_and_val_comes_from_train_sequences(tiny_root):
    data = module(tiny_root)
    data.setup("fit")
    data.setup("test")
    train, val, test = data.datasets["train"].samples, data.datasets["val"].samples, data.datasets["test"].samples
    assert len(train) + len(val) == 18 and len(test) == 6
    train_sequences, val_sequences = {s.sequence for s in train}, {s.sequence for s in val}
    assert len(val_sequences) == 2 and not train_sequences & val_sequences  # whole sequences held out
    assert all("/TRAIN/" in s.name for s in train + val) and all("/TEST/" in s.name for s in test)
    assert not {s.name for s in train + val} & {s.name for s in test}
    # Deterministic: another module makes the same choice; another seed may not.
    again = module(tiny_root)
    again.setup("fit")
    assert [s.name for s in again.datasets["val"].samples] == [s.name for s in val]


def test_samples_and_batches(tiny_root):
    data = module(tiny_root, crop_size=(32, 64), batch_size=3, eval_batch_size=2, limit_train=7, limit_val=3,
                  limit_test=4)
    data.setup("fit")
    data.setup("test")
    assert (len(data.datasets["train"]), len(data.datasets["val"]), len(data.datasets["test"])) == (7, 3, 4)
    sample = data.datasets["val"][0]
    assert set(sample) == {"left", "right", "disparity", "name"}
    assert sample["left"].shape == sample["right"].shape == (3, 48, 96) and sample["left"].dtype == torch.float32
    assert 0 <= float(sample["left"].min()) and float(sample["left"].max()) <= 1
    assert sample["disparity"].shape == (48, 96) and sample["disparity"].dtype == torch.float32
    expected = read_pfm(tiny_root / sample["name"].replace("frames_cleanpass", "disparity").replace(".png", ".pfm"))
    np.testing.assert_array_equal(sample["disparity"].numpy(), expected)
    np.testing.assert_allclose(sample["left"].permute(1, 2, 0).numpy() * 255, read_image(tiny_root / sample["name"]),
                               atol=1e-3)
    batch = next(iter(data.train_dataloader()))
    assert batch["left"].shape == (3, 3, 32, 64) and batch["disparity"].shape == (3, 32, 64)
    assert len(batch["name"]) == 3
    batch = next(iter(data.test_dataloader()))
    assert batch["left"].shape == (2, 3, 48, 96)  # full images for evaluation
    assert data.disparity_range is None  # real Scene Flow states no range: the model chooses


def test_both_passes_and_crop_larger_than_image(tiny_root):
    data = module(tiny_root, passes=["cleanpass", "finalpass"], crop_size=(256, 512), val_fraction=0)
    data.setup("fit")
    names = [s.name for s in data.datasets["train"].samples]
    assert len(names) == 36 and sum("frames_finalpass" in n for n in names) == 18
    assert data.val_dataloader() == []
    assert data.datasets["train"][0]["left"].shape == (3, 48, 96)  # crop clipped to the image


def test_missing_disparity_file_is_named(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    missing = root / "FlyingThings3D" / "disparity" / "TRAIN" / "B" / "0001" / "left" / "0007.pfm"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as info:
        module(root).setup("fit")
    assert str(missing) in str(info.value) and "1 file(s) missing" in str(info.value)

    (root / "FlyingThings3D" / "frames_cleanpass" / "TEST" / "A" / "0000" / "right" / "0006.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"TEST/A/0000/right/0006\.png"):
        module(root).setup("test")


def test_empty_and_incomplete_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="FlyingThings3D"):
        module(tmp_path).setup("fit")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        module(tmp_path / "nowhere").setup("fit")
    (tmp_path / "FlyingThings3D" / "frames_cleanpass" / "TRAIN").mkdir(parents=True)
    (tmp_path / "FlyingThings3D" / "disparity").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no frames found .*frames_cleanpass/TRAIN"):
        module(tmp_path).setup("fit")
    with pytest.raises(FileNotFoundError, match="frames_finalpass"):
        module(tmp_path, passes=["finalpass"]).setup("fit")


def test_missing_subset_is_named(tiny_root):
    with pytest.raises(FileNotFoundError, match=r"'monkaa' not found.*Monkaa"):
        module(tiny_root, subsets=["flyingthings3d", "monkaa"]).setup("fit")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="passes"):
        SceneFlowDataModule(passes=["clean"])
    with pytest.raises(ValueError, match="subsets"):
        SceneFlowDataModule(subsets=["kitti"])
    with pytest.raises(ValueError, match="val_fraction"):
        SceneFlowDataModule(val_fraction=1.5)


def test_embedded_set_is_announced_loudly(tiny_root, monkeypatch, caplog):
    monkeypatch.setattr(sceneflow, "ensure_synthetic_sceneflow", lambda: tiny_root)
    data = SceneFlowDataModule(root=None, num_workers=0, val_fraction=0.34)  # default subsets
    with caplog.at_level(logging.WARNING, logger="lattn_app.data.base"):
        data.setup("fit")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("EMBEDDED SYNTHETIC" in m and "--data.root" in m for m in warnings)
    assert data.is_embedded and len(data.datasets["train"]) == 12
    assert data.disparity_range == 48  # what a model with max_disparity unset takes for the embedded set
    assert SceneFlowDataModule(root=str(tiny_root)).disparity_range is None


def test_exclude_unused_frames(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    unused = "TRAIN/A/0000/left/0006.png\nTRAIN/C/0001/right/0008.png\n"  # either view listed: frame skipped
    (root / "FlyingThings3D" / "all_unused_files.txt").write_text(unused)
    data = module(root, val_fraction=0)
    data.setup("fit")
    names = {s.name for s in data.datasets["train"].samples}
    assert len(names) == 16
    assert "FlyingThings3D/frames_cleanpass/TRAIN/A/0000/left/0006.png" not in names
    everything = module(root, val_fraction=0, exclude_unused=False)
    everything.setup("fit")
    assert len(everything.datasets["train"]) == 18


def test_invalid_and_negative_disparities(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    path = root / "FlyingThings3D" / "disparity" / "TEST" / "A" / "0000" / "left" / "0006.pfm"
    disparity = read_pfm(path)
    disparity[0, :5] = np.inf
    disparity[1, :5] = np.nan
    write_pfm(path, disparity)
    data = module(root)
    data.setup("test")
    loaded = data.datasets["test"][0]["disparity"]
    assert data.datasets["test"].samples[0].disparity == path
    assert (loaded[:2, :5] == 0).all() and torch.isfinite(loaded).all()  # non-finite -> 0 (invalid)
    disparity[2, 3] = -1.0
    write_pfm(path, disparity)
    with pytest.raises(ValueError, match=r"0006\.pfm: negative disparities"):
        data.datasets["test"][0]


# ---------------------------------------------------------------------------------- augmentation


def coordinate_pattern(height, width):
    """An image whose pixels encode their coordinates, and the coordinates as a float map."""
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs % 256, ys % 256, xs // 256 * 16 + ys // 256], axis=-1).astype(np.uint8)
    return image, (ys * 1000 + xs).astype(np.float32)


def test_crop_is_identical_on_both_views():
    image, coordinates = coordinate_pattern(60, 90)
    augment = StereoAugmentation(crop_size=(24, 40), brightness=0, contrast=0, saturation=0, hue=0, gamma=None)
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(10):
        out = augment(image, image.copy(), coordinates, coordinates + 0.5, rng=rng)
        assert out["left"].shape == (24, 40, 3) and out["disparity"].shape == (24, 40)
        np.testing.assert_array_equal(out["left"], out["right"])
        y0, x0 = int(out["left"][0, 0, 1]), int(out["left"][0, 0, 0])
        np.testing.assert_array_equal(out["left"], image[y0 : y0 + 24, x0 : x0 + 40])
        np.testing.assert_array_equal(out["disparity"], coordinates[y0 : y0 + 24, x0 : x0 + 40])
        np.testing.assert_array_equal(out["disparity_right"], out["disparity"] + 0.5)
        corners.add((y0, x0))
    assert len(corners) > 5  # random windows


def test_flip_swaps_the_views_consistently():
    frame = render_sequence(7, height=48, width=96, frames=1, max_disparity=24.0, subpixel=False)[0]
    augment = StereoAugmentation(crop_size=None, brightness=0, contrast=0, saturation=0, hue=0, gamma=None,
                                 flip_prob=1.0)
    out = augment(frame.left, frame.right, frame.disparity_left, frame.disparity_right, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out["left"], frame.right[:, ::-1])
    np.testing.assert_array_equal(out["disparity"], frame.disparity_right[:, ::-1])
    visible, same = exact_matches(out["left"], out["right"], out["disparity"], out["disparity_right"])
    assert visible.mean() > 0.6 and same[visible].all()  # new left(x) == new right(x - d)
    assert (out["disparity"] >= 0).all()
    # Without the right-view disparity there is no flip.
    kept = augment(frame.left, frame.right, frame.disparity_left, None, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(kept["left"], frame.left)


def test_rescale_scales_the_disparity():
    image, _ = coordinate_pattern(20, 30)
    disparity = np.random.default_rng(0).uniform(1, 10, (20, 30)).astype(np.float32)
    augment = StereoAugmentation(crop_size=None, brightness=0, contrast=0, saturation=0, hue=0, gamma=None,
                                 rescale=(2.0, 2.0))
    out = augment(image, image, disparity, rng=np.random.default_rng(0))
    assert out["left"].shape == (40, 60, 3) and out["disparity"].shape == (40, 60)
    np.testing.assert_allclose(out["disparity"][::2, ::2], 2 * disparity)
    # With a crop, the scale never shrinks the image below the crop.
    augment = StereoAugmentation(crop_size=(16, 24), rescale=(0.2, 0.3))
    cropped = augment(image, image, disparity, rng=np.random.default_rng(1))
    assert cropped["left"].shape == (16, 24, 3)
    assert cropped["disparity"].max() <= disparity.max() * 0.81  # scaled by 24 / 30 = 0.8 at least


def test_photometric_jitter_differs_between_views_when_asymmetric():
    image = np.random.default_rng(0).integers(30, 220, (16, 16, 3), dtype=np.uint8)
    disparity = np.ones((16, 16), np.float32)
    asymmetric = StereoAugmentation(crop_size=None)(image, image, disparity, rng=np.random.default_rng(0))
    assert not np.array_equal(asymmetric["left"], asymmetric["right"])
    augment = StereoAugmentation(crop_size=None, asymmetric_color=False)
    symmetric = augment(image, image, disparity, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(symmetric["left"], symmetric["right"])
    assert not np.array_equal(symmetric["left"], image)


def test_training_augmentation_is_reproducible_from_the_sample_seed(tiny_root):
    data = module(tiny_root, crop_size=(32, 48), flip_prob=0.5, rescale=(0.9, 1.3))
    data.setup("fit")
    seeded = SeededDataset(data.datasets["train"])  # what the training loader reads samples through
    first, again = seeded[SeededIndex(0, 5)], seeded[SeededIndex(0, 5)]
    assert torch.equal(first["left"], again["left"]) and torch.equal(first["disparity"], again["disparity"])
    assert first["left"].shape == (3, 32, 48)
    other = [seeded[SeededIndex(0, seed)]["left"] for seed in (6, 7, 8)]
    assert not all(torch.equal(first["left"], left) for left in other)


# ------------------------------------------------------------------------------------------ predict


def test_predict_pairs_from_folder_and_list(tmp_path):
    rng = np.random.default_rng(0)
    for side in ("left", "right"):
        (tmp_path / "pairs" / side).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "pairs" / side / "a.png")
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "pairs" / side / "b.png")
    data = SceneFlowDataModule(root=None, predict_pairs=str(tmp_path / "pairs"), num_workers=0, eval_batch_size=1)
    data.setup("predict")  # no dataset needed (and no synthetic set generated) for prediction
    assert data._dataset_root is None
    samples = [data.datasets["predict"][i] for i in range(2)]
    assert [s["name"] for s in samples] == ["left/a.png", "left/b.png"]
    assert "disparity" not in samples[0] and samples[1]["left"].shape == (3, 24, 40)
    assert len(list(data.predict_dataloader())) == 2

    pairs = find_predict_pairs([[str(tmp_path / "pairs/left/a.png"), str(tmp_path / "pairs/right/a.png")],
                                [str(tmp_path / "pairs/left/b.png"), str(tmp_path / "pairs/right/b.png")]])
    assert [p.name for p in pairs] == ["a.png", "b.png"]
    # Pairs of different sizes batch by default (issue 20, item 9): the maps stay per-sample tensors.
    mixed = next(iter(torch.utils.data.DataLoader(StereoDataset(pairs), batch_size=2, collate_fn=stereo_collate)))
    assert mixed["name"] == ["a.png", "b.png"]
    assert [tuple(t.shape) for t in mixed["left"]] == [(1, 3, 20, 30), (1, 3, 24, 40)]

    (tmp_path / "pairs" / "right" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"right/b\.png"):
        find_predict_pairs(tmp_path / "pairs")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        find_predict_pairs([[str(tmp_path / "missing.png"), str(tmp_path / "pairs/right/a.png")]])


# ------------------------------------------------------------------------------ Monkaa and Driving


def write_frame(root: Path, subset: str, sequence: str, frame: str, rng, height=12, width=20, value=None):
    """One frame of `subset` in the distributed layout (cleanpass images, left and right disparities)."""
    for side in ("left", "right"):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = root / subset / "frames_cleanpass" / sequence / side / f"{frame}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        disparity = np.full((height, width), value if value is not None else rng.uniform(1, 5), np.float32)
        write_pfm(root / subset / "disparity" / sequence / side / f"{frame}.pfm", disparity)


def test_monkaa_and_driving_layouts(tmp_path):
    rng = np.random.default_rng(0)
    monkaa_scenes = ["a_rain_of_stones_x2", "eating_camera2_x2", "family_x2"]
    for scene in monkaa_scenes:
        for frame in ("0000", "0001"):
            write_frame(tmp_path, "monkaa", scene, frame, rng, value=3.25)  # lower-case subset folder
    driving = [f"{focal}/{direction}/{speed}" for focal in ("15mm_focallength", "35mm_focallength")
               for direction in ("scene_backwards", "scene_forwards") for speed in ("fast", "slow")]
    for sequence in driving:
        write_frame(tmp_path, "Driving", sequence, "0001", rng, value=7.5)
    data = module(tmp_path, subsets=["monkaa", "driving"], val_fraction=0.2)
    data.setup("fit")
    samples = data.datasets["train"].samples + data.datasets["val"].samples
    assert len(samples) == 3 * 2 + 8
    sequences = {s.sequence for s in samples}
    assert {f"monkaa/{scene}" for scene in monkaa_scenes} <= sequences
    assert {f"driving/{sequence}" for sequence in driving} <= sequences
    assert len({s.sequence for s in data.datasets["val"].samples}) == 3  # round(0.2 * 3) + round(0.2 * 8)
    by_name = {s.name: s for s in samples}
    assert "monkaa/frames_cleanpass/family_x2/left/0001.png" in by_name
    driving_name = "Driving/frames_cleanpass/35mm_focallength/scene_forwards/slow/left/0001.png"
    expected = tmp_path / "Driving/disparity/35mm_focallength/scene_forwards/slow/left/0001.pfm"
    assert by_name[driving_name].disparity == expected
    dataset = StereoDataset(samples)
    index = samples.index(by_name[driving_name])
    assert torch.all(dataset[index]["disparity"] == 7.5)
    # The test split is FlyingThings3D TEST, absent here.
    with pytest.raises(FileNotFoundError, match="FlyingThings3D"):
        data.setup("test")


def test_datamodule_arguments_parse_like_the_cli():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SceneFlowDataModule, "data")
    config = parser.parse_args(["--data.crop_size=[64, 128]", "--data.passes=[cleanpass, finalpass]",
                                "--data.predict_pairs=some/folder", "--data.rescale=[0.8, 1.2]"])
    assert tuple(config.data.crop_size) == (64, 128) and config.data.passes == ["cleanpass", "finalpass"]
    assert config.data.root is None and "max_disparity" not in config.data  # the model's, not the data's
    data = parser.instantiate(config).data
    assert isinstance(data, SceneFlowDataModule) and data.train_transform.crop_size == (64, 128)


def test_an_unset_crop_size_is_whole_images_on_the_embedded_set_and_256x512_on_real_data(tiny_root, caplog):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SceneFlowDataModule, "data")
    assert parser.get_defaults().data.crop_size is None  # what --print_config shows: nothing it does not do
    assert parser.parse_args(["--data.crop_size=whole"]).data.crop_size == "whole"
    embedded = SceneFlowDataModule(root=None)
    real = SceneFlowDataModule(root=str(tiny_root), subsets=["flyingthings3d"])
    assert embedded.train_transform.crop_size is None and real.train_transform.crop_size == (256, 512)
    assert SceneFlowDataModule(root=str(tiny_root), crop_size="whole").train_transform.crop_size is None
    with caplog.at_level(logging.INFO, logger="lattn_app.data.stereo.datamodule"):
        real.setup("fit")
    assert "training: 256 x 512 crops (crop_size unset: real data)" in caplog.text
    with pytest.raises(ValueError, match="crop_size must be \\(height, width\\), 'whole' or None; got 'full'"):
        SceneFlowDataModule(root=None, crop_size="full")
