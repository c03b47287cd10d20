"""Classification data: image folders, CIFAR pickles, transforms and the embedded synthetic set.

Every dataset here is written into tmp_path in its real on-disk format (PNG folders in the ImageNet
layout, CIFAR "python version" pickles) and read through the data modules as Lightning would.
"""

from __future__ import annotations

import logging
import pickle
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lattn_app.data import synthetic_classification as synthetic
from lattn_app.data.classification import CIFARDataModule, ImageFolderDataModule
from lattn_app.data.io import ImageReadError
from lattn_app.data.transforms import (
    cifar_train_transform,
    classification_eval_transform,
    classification_train_transform,
)

# ---------------------------------------------------------------------------------------------------
# Tiny real-format data
# ---------------------------------------------------------------------------------------------------


def write_png(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    Image.fromarray(np.full((height, width, 3), colour, np.uint8)).save(path)
    return path


def make_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<i>.png with a per-class colour; layout = {split: {class: count}}."""
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                write_png(root / split / name / f"{i}.png", colour=(10 * len(name), 50, 100 + i))
    return root


LAYOUT = {
    "train": {"dog": 3, "cat": 2, "bird": 2},
    "val": {"cat": 2, "dog": 1},  # no bird: fine
    "test": {"bird": 1, "cat": 1, "dog": 1},
}


def folder_module(root: Path, **options) -> ImageFolderDataModule:
    options = {"image_size": 16, "batch_size": 2, "num_workers": 0, **options}
    return ImageFolderDataModule(root=str(root), **options)


def write_pickle(path: Path, content: dict, numpy1: bool = False) -> None:
    """Pickle protocol 2 as the CIFAR files; `numpy1`: name numpy's functions as numpy 1 did."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = pickle.dumps(content, protocol=2)
    if numpy1:
        assert b"numpy._core.multiarray" in raw
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)


def cifar_rows(n: int, start: int) -> np.ndarray:
    """n CIFAR rows (3072 uint8: R plane, G plane, B plane, each 32x32 row-major) with known pixels."""
    data = np.zeros((n, 3072), np.uint8)
    for i in range(n):
        index = start + i
        data[i, 0 * 1024 + 2 * 32 + 5] = 200  # R at row 2, column 5
        data[i, 1 * 1024 + 2 * 32 + 5] = 100  # G
        data[i, 2 * 1024 + 2 * 32 + 5] = 50  # B
        data[i, 0 * 1024 + 31 * 32 + 0] = index  # R at row 31, column 0: the image's global index
    return data


def make_cifar10(root: Path, per_batch: int = 8, test: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072, b"num_cases_per_batch": per_batch})
    for b in range(5):
        start = b * per_batch
        write_pickle(folder / f"data_batch_{b + 1}", {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"data": cifar_rows(per_batch, start),
            b"labels": [(start + i) % 10 for i in range(per_batch)],
            b"filenames": [f"img{start + i}.png".encode() for i in range(per_batch)],
        }, numpy1=b == 0)  # the real files were written with numpy 1
    write_pickle(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"data": cifar_rows(test, 100),
        b"labels": [(9 - i) % 10 for i in range(test)],
    })
    return folder


def make_cifar100(root: Path, train: int = 30, test: int = 5) -> Path:
    folder = root / "cifar-100-python"
    fine = [f"fine{i:02d}".encode() for i in range(100)]
    coarse = [f"coarse{i:02d}".encode() for i in range(20)]
    write_pickle(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    write_pickle(folder / "train", {
        b"data": cifar_rows(train, 0),
        b"fine_labels": [(7 * i) % 100 for i in range(train)],
        b"coarse_labels": [i % 20 for i in range(train)],
    })
    write_pickle(folder / "test", {
        b"data": cifar_rows(test, 100),
        b"fine_labels": [99 - i for i in range(test)],
        b"coarse_labels": [0] * test,
    })
    return folder


# ---------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------


def test_transforms_give_float_chw_tensors_in_unit_range():
    image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    pipelines = [
        classification_train_transform(24),
        classification_eval_transform(24),
        classification_eval_transform(24, crop_pct=1.0),
        cifar_train_transform(),
    ]
    for pipeline in pipelines:
        source = image[:32, :32] if pipeline is pipelines[-1] else image
        out = pipeline(image=source)["image"]
        size = 32 if pipeline is pipelines[-1] else 24
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.shape == (3, size, size)
        assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.5  # not still 0..255


def test_eval_transform_is_deterministic_and_train_transform_is_random():
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    evaluate = classification_eval_transform(32)
    assert torch.equal(evaluate(image=image)["image"], evaluate(image=image)["image"])
    train = classification_train_transform(32)
    outs = [train(image=image)["image"] for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    cifar = cifar_train_transform()
    outs = [cifar(image=image[:32, :32])["image"] for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_eval_transform_on_square_input_with_crop_pct_1_is_plain_conversion():
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = classification_eval_transform(32, crop_pct=1.0)(image=image)["image"]
    assert torch.allclose(out, torch.from_numpy(image).permute(2, 0, 1).float() / 255)


def test_transform_arguments_are_checked():
    with pytest.raises(ValueError, match="crop_pct"):
        classification_eval_transform(32, crop_pct=1.5)
    with pytest.raises(ValueError, match="image_size"):
        classification_train_transform(0)
    with pytest.raises(ValueError, match="scale"):
        classification_train_transform(32, scale=(0.5, 0.1))


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------


def test_classes_are_known_before_setup_and_labels_follow_folders(tmp_path):
    data = folder_module(make_folder(tmp_path, LAYOUT))
    assert data.class_names == ["bird", "cat", "dog"] and data.num_classes == 3 and data.image_size == 16
    data.setup("fit")
    train = data.datasets["train"]
    assert len(train) == 7
    for path, label in zip(train.paths, train.labels):
        assert data.class_names[label] == Path(path).parent.name
    batches = list(data.train_dataloader())
    assert len(batches) == 3  # 7 images, batch 2, last incomplete batch dropped
    batch = batches[0]
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2,)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1


def test_val_and_test_are_separate_folders(tmp_path):
    root = make_folder(tmp_path, LAYOUT)
    data = folder_module(root)
    data.setup("fit")
    data.setup("test")
    val, test = data.datasets["val"], data.datasets["test"]
    assert all(Path(p).parent.parent == root / "val" for p in val.paths)
    assert all(Path(p).parent.parent == root / "test" for p in test.paths)
    assert sorted(data.class_names[label] for label in val.labels) == ["cat", "cat", "dog"]
    batch = next(iter(data.test_dataloader()))
    assert batch["label"].tolist() == [0, 1]  # bird, cat (eval loaders keep the order)
    assert len(data.val_dataloader()) == 2 and len(data.test_dataloader()) == 2


def test_missing_test_folder_is_an_error_not_the_val_folder(tmp_path):
    root = make_folder(tmp_path, {"train": LAYOUT["train"], "val": LAYOUT["val"]})
    data = folder_module(root)
    data.setup("fit")  # fine without a test folder
    with pytest.raises(FileNotFoundError, match="no held-out test folder.*never used as the test set"):
        data.setup("test")
    with pytest.raises(FileNotFoundError, match="test_dir is None"):
        folder_module(root, test_dir=None).setup("test")


def test_class_not_in_train_is_named(tmp_path):
    root = make_folder(tmp_path, {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "zebra": 1}})
    with pytest.raises(ValueError, match="class 'zebra' is not one of the 2 training classes"):
        folder_module(root).setup("fit")


def test_empty_class_folder_and_empty_split_are_errors(tmp_path):
    root = make_folder(tmp_path / "a", {"train": {"cat": 1}, "val": {"cat": 1}})
    (root / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"train[/\\]dog: class folder has no images"):
        folder_module(root).setup("fit")
    empty = tmp_path / "b"
    (empty / "train").mkdir(parents=True)
    # The classes are read on first use (the command line does it right after building the datamodule).
    with pytest.raises(ValueError, match="has no class subfolders"):
        folder_module(empty).num_classes
    no_root = r"root \S*nowhere does not exist or is not a folder; expected a folder with train/"
    with pytest.raises(FileNotFoundError, match=no_root):
        folder_module(tmp_path / "nowhere").num_classes
    with pytest.raises(FileNotFoundError, match=r"nowhere.*expected a split folder"):
        folder_module(root, train_dir="nowhere").num_classes


def test_extensions_are_case_insensitive_and_other_files_ignored(tmp_path):
    root = make_folder(tmp_path, {"train": {"cat": 1}, "val": {"cat": 1}})
    write_png(root / "train" / "cat" / "UPPER.PNG")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    write_png(root / "train" / "cat" / "._0.png")  # hidden entries (macOS metadata, notebook checkpoints)
    write_png(root / "train" / "cat" / ".ipynb_checkpoints" / "1.png")
    write_png(root / "train" / ".ipynb_checkpoints" / "2.png")
    data = folder_module(root)
    data.setup("fit")
    assert data.class_names == ["cat"]
    assert sorted(Path(p).name for p in data.datasets["train"].paths) == ["0.png", "UPPER.PNG"]


def test_corrupt_image_raises_naming_the_file(tmp_path):
    root = make_folder(tmp_path, {"train": {"cat": 2}, "val": {"cat": 1}})
    broken = root / "train" / "cat" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    data = folder_module(root)
    data.setup("fit")
    with pytest.raises(ImageReadError, match=r"1\.png"):
        list(data.train_dataloader())


def test_predict_dir_yields_paths(tmp_path):
    root = make_folder(tmp_path / "data", LAYOUT)
    photos = tmp_path / "photos"
    expected = [write_png(photos / "a.png"), write_png(photos / "nested" / "b.JPG", size=(50, 30))]
    (photos / "readme.md").write_text("skipped")
    data = folder_module(root, predict_dir=str(photos), eval_batch_size=4)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch["path"] == [str(p) for p in expected]
    assert batch["image"].shape == (2, 3, 16, 16) and "label" not in batch
    with pytest.raises(ValueError, match="--data.predict_dir"):
        folder_module(root).setup("predict")


def test_augmentation_is_seeded_per_sample_and_differs_between_workers(tmp_path):
    root = make_folder(tmp_path, {"train": {"cat": 1}, "val": {"cat": 1}})
    image = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "train" / "cat" / "0.png")
    data = folder_module(root, batch_size=1)
    data.setup("fit")
    train = data.datasets["train"]
    train.paths, train.labels = train.paths * 4, np.repeat(train.labels, 4)  # one image, four times

    def epoch() -> torch.Tensor:
        return torch.cat([b["image"] for b in data.train_dataloader()])

    torch.manual_seed(5)
    first = epoch()
    torch.manual_seed(5)
    assert torch.equal(first, epoch())  # reproducible: seeded by (run seed, epoch, sample)
    assert not torch.equal(first[0], first[1])
    data.num_workers = 2
    loader = data.train_dataloader()
    outs = [b["image"] for b in loader]  # workers alternate: samples 0, 2 from one, 1, 3 from the other
    assert not torch.equal(outs[0], outs[1])


def test_lightning_fit_and_test_on_image_folders(tmp_path):
    data = folder_module(make_folder(tmp_path / "data", LAYOUT))

    class Tiny(pl.LightningModule):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.head = nn.Linear(3, num_classes)

        def step(self, batch):
            return nn.functional.cross_entropy(self.head(batch["image"].mean((2, 3))), batch["label"])

        def training_step(self, batch, batch_idx):
            return self.step(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.step(batch))

        def test_step(self, batch, batch_idx):
            self.log("test_loss", self.step(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    model = Tiny(data.num_classes)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    assert "test_loss" in trainer.test(model, datamodule=data, verbose=False)[0]


# ---------------------------------------------------------------------------------------------------
# The embedded synthetic set
# ---------------------------------------------------------------------------------------------------

SMALL = {"image_size": 32, "train_per_class": 2, "val_per_class": 1, "test_per_class": 1}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_set_is_deterministic_cached_and_complete(tmp_path, monkeypatch):
    root = synthetic.ensure_synthetic_classification(tmp_path / "a", **SMALL)
    again = synthetic.ensure_synthetic_classification(tmp_path / "b", **SMALL)
    assert _files(root) == _files(again)  # same bytes from a fresh generation
    assert "procedurally generated" in (root / "README.txt").read_text()
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(synthetic.SYNTHETIC_CLASSES)
        assert all(len(list((root / split / c).glob("*.png"))) == count for c in synthetic.SYNTHETIC_CLASSES)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [root.name]  # no temporary left behind
    image = np.asarray(Image.open(next((root / "train" / "circle").iterdir())))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8

    def no_regeneration(*args, **kwargs):
        raise AssertionError("the cached set was regenerated")

    monkeypatch.setattr(synthetic, "render_synthetic_image", no_regeneration)
    start = time.perf_counter()
    assert synthetic.ensure_synthetic_classification(tmp_path / "a", **SMALL) == root
    assert time.perf_counter() - start < 0.5
    other = dict(SMALL, seed=1)
    with pytest.raises(AssertionError, match="regenerated"):  # other arguments: another set
        synthetic.ensure_synthetic_classification(tmp_path / "a", **other)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [root.name]  # the failed one left nothing


def test_synthetic_classes_differ_and_images_vary():
    rng = np.random.default_rng(0)
    images = {name: synthetic.render_synthetic_image(name, rng, 32) for name in synthetic.SYNTHETIC_CLASSES}
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for img in images.values())
    again = synthetic.render_synthetic_image("circle", rng, 32)
    assert not np.array_equal(images["circle"], again)


def test_root_none_uses_the_synthetic_set_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "cache"))
    assert synthetic.default_cache_dir() == tmp_path / "cache"
    data = ImageFolderDataModule(root=None, image_size=32, batch_size=8, num_workers=0)
    assert not list((tmp_path / "cache").glob("synthetic_classification_*"))  # generated on first use, not here
    with caplog.at_level(logging.WARNING):
        assert data.class_names == list(synthetic.SYNTHETIC_CLASSES) and data.num_classes == 10
    assert data.is_embedded and data.dataset_root.parent == tmp_path / "cache"
    assert any("SYNTHETIC" in r.getMessage() and "--data.root" in r.getMessage() for r in caplog.records)
    data.setup("fit")
    data.setup("test")
    assert (len(data.datasets["train"]), len(data.datasets["val"]), len(data.datasets["test"])) == (1000, 250, 250)


# ---------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------


def test_cifar10_reads_pickles_with_the_right_orientation(tmp_path):
    make_cifar10(tmp_path)
    data = CIFARDataModule(root=str(tmp_path), val_size=10, batch_size=4, num_workers=0)
    assert data.num_classes == 10 and data.class_names[:2] == ["airplane", "automobile"]
    assert data.image_size == 32
    data.setup("test")
    test = data.datasets["test"]
    assert len(test) == 6 and test.labels.tolist() == [9, 8, 7, 6, 5, 4]
    sample = test[0]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    pixel = (sample["image"][:, 2, 5] * 255).round().tolist()
    assert pixel == [200, 100, 50]  # R, G, B planes at row 2, column 5
    assert round(float(sample["image"][0, 31, 0]) * 255) == 100  # bottom-left corner: row 31, column 0
    assert float(sample["image"][:, 5, 2].sum()) == 0  # not transposed
    batch = next(iter(data.test_dataloader()))
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [9, 8, 7, 6]


def test_cifar_val_split_is_disjoint_deterministic_and_from_the_training_batches(tmp_path):
    make_cifar10(tmp_path)
    data = CIFARDataModule(root=str(tmp_path / "cifar-10-batches-py"), val_size=10, num_workers=0, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 1 names (numpy.core) load without numpy 2's deprecation
        data.setup("fit")
    train, val = data.train_indices, data.val_indices
    assert len(val) == 10 and len(train) == 30 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(40))
    # The val images are those training images: global index stored in pixel (31, 0).
    ids = [round(float(data.datasets["val"][i]["image"][0, 31, 0]) * 255) for i in range(10)]
    assert ids == val.tolist() and data.datasets["val"].labels.tolist() == [i % 10 for i in ids]
    again = CIFARDataModule(root=str(tmp_path), val_size=10, num_workers=0)
    again.setup("validate")
    assert np.array_equal(again.val_indices, val)
    other = CIFARDataModule(root=str(tmp_path), val_size=10, split_seed=1, num_workers=0)
    other.setup("fit")
    assert not np.array_equal(other.val_indices, val)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64


def test_cifar100_uses_fine_labels(tmp_path):
    make_cifar100(tmp_path)
    data = CIFARDataModule(root=str(tmp_path), variant="cifar100", val_size=5, num_workers=0, image_size=40)
    assert data.num_classes == 100 and data.class_names[7] == "fine07"
    data.setup("fit")
    data.setup("test")
    assert sorted(data.datasets["train"].labels.tolist() + data.datasets["val"].labels.tolist()) == sorted(
        (7 * i) % 100 for i in range(30)
    )
    assert data.datasets["test"].labels.tolist() == [99, 98, 97, 96, 95]
    assert data.datasets["test"][0]["image"].shape == (3, 40, 40)
    assert data.datasets["train"][0]["image"].shape == (3, 40, 40)


def test_cifar_errors_name_the_file(tmp_path):
    missing = r"cifar-10-batches-py[/\\]batches\.meta not found.*cifar-10-python\.tar\.gz"
    with pytest.raises(FileNotFoundError, match=missing):  # the files are looked for on first use of the classes
        CIFARDataModule(root=str(tmp_path)).num_classes
    folder = make_cifar10(tmp_path)
    with pytest.raises(ValueError, match="variant must be one of"):
        CIFARDataModule(root=str(tmp_path), variant="cifar1000")
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00garbage")
    data = CIFARDataModule(root=str(tmp_path), val_size=5, num_workers=0)
    with pytest.raises(ValueError, match=r"data_batch_3: not a readable cifar10 pickle"):
        data.setup("fit")
    write_pickle(folder / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_3: 'data' must be a uint8 array of shape \(N, 3072\)"):
        CIFARDataModule(root=str(tmp_path), val_size=5, num_workers=0).setup("fit")
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_batch not found"):
        CIFARDataModule(root=str(tmp_path)).num_classes


def test_cifar_pickles_cannot_run_code(tmp_path, capsys):
    folder = make_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    write_pickle(folder / "batches.meta", {b"label_names": Evil()})
    with pytest.raises(ValueError, match=r"batches\.meta: not a readable cifar10 pickle.*refusing to load .*print"):
        CIFARDataModule(root=str(tmp_path)).class_names
    # A batch file is opened safely before torchvision (which uses pickle.load) reads it.
    folder = make_cifar10(tmp_path / "again")
    write_pickle(folder / "data_batch_2", {b"data": Evil(), b"labels": []})
    with pytest.raises(ValueError, match=r"data_batch_2: not a readable cifar10 pickle.*refusing to load .*print"):
        CIFARDataModule(root=str(folder), val_size=5, num_workers=0).setup("fit")
    assert "pwned" not in capsys.readouterr().out
