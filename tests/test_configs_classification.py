"""Every classification config under configs/ parses and trains one batch (`lattn fit --trainer.fast_dev_run 1`).

CIFAR configs read tiny CIFAR-10 pickles in the real "python version" format; ImageNet configs read a
tiny ImageNet-layout folder of PNGs, at a small image size and batch so that the whole file stays fast
on a CPU. The pretrained ViT-S config gets a local timm ``vit_small_patch16_224`` state dict instead of
its timm name, so nothing is downloaded. Every run happens in a temporary directory.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the timm name in the fine-tuning config must never download

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from lattn_app.cli import config_chain, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def merged(into: dict, overlay: dict) -> dict:
    """`overlay` over `into` as LightningCLI reads several configs: groups merge, values and lists replace."""
    result = dict(into)
    for key, value in overlay.items():
        both_groups = isinstance(value, dict) and isinstance(result.get(key), dict) and key.endswith(("model", "data", "init_args", "trainer"))
        result[key] = merged(result[key], value) if both_groups else value
    return result


def resolved(path: Path) -> dict:
    """A config with the configs it extends read first."""
    content: dict = {}
    for file in config_chain(path):
        content = merged(content, yaml.safe_load(file.read_text()))
    return content


def classification_configs() -> list[Path]:
    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        model = resolved(path).get("model", {})
        if model.get("class_path", "").split(".")[-1] == "ClassificationTask":
            found.append(path)
    return found


CLASSIFICATION_CONFIGS = classification_configs()
IDS = [path.stem for path in CLASSIFICATION_CONFIGS]


def test_the_issue_s_configs_are_shipped():
    names = set(IDS)
    for attention in ("softmax", "efficient", "performer", "linformer", "nystrom", "fnet", "mixer"):
        assert f"cifar10_vix_{attention}" in names
    assert any(name.startswith("cifar10_vix_") and name.endswith("_convstem") for name in names)
    assert any(name.startswith("cifar10_vix_") and name.endswith("_rope") for name in names)
    for name in ("imagenet_care_s0", "imagenet_care_s1", "imagenet_care_s2", "imagenet_couplformer",
                 "imagenet_vit_small_finetune_efficient", "classification_quickstart"):
        assert name in names


def write_cifar10(root: Path, per_batch: int = 4, test: int = 4) -> Path:
    """cifar-10-batches-py with the official files and keys (bytes keys, uint8 (N, 3072) rows)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def dump(name: str, content: dict) -> None:
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))

    dump("batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    for i in range(1, 6):
        dump(f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                 b"labels": rng.integers(0, 10, per_batch).tolist(),
                                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                                 b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)]})
    dump("test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": rng.integers(0, 10, test).tolist(),
                        b"data": rng.integers(0, 256, (test, 3072), dtype=np.uint8),
                        b"filenames": [f"test_{j}.png".encode() for j in range(test)]})
    return root


def write_image_folder(root: Path, classes=("n01440764", "n01443537", "n01484850"), per_class: int = 2) -> Path:
    """ImageNet layout: train/, val/ and test/ with one folder of PNGs per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("classification_data")
    return {"cifar": write_cifar10(base / "cifar"), "imagenet": write_image_folder(base / "imagenet")}


@pytest.fixture(scope="module")
def vit_small_weights(tmp_path_factory) -> Path:
    """A timm vit_small_patch16_224 state dict in a local file (random weights: nothing is downloaded)."""
    path = tmp_path_factory.mktemp("weights") / "vit_small_patch16_224.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), path)
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty directory, with the synthetic-data cache there too: nothing lands in the repo."""
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config", CLASSIFICATION_CONFIGS, ids=IDS)
def test_config_parses(config, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("ClassificationTask")
    monitors = [c["init_args"].get("monitor") for c in printed["trainer"]["callbacks"]
                if c["class_path"].endswith(("ModelCheckpoint", "LattnCheckpoint"))]
    assert monitors == ["val_acc"]


def small_run_overrides(config: Path, data_roots: dict[str, Path], weights: Path) -> list[str]:
    """Overrides that keep the config's model and recipe but make one batch cheap on a CPU."""
    content = resolved(config)
    data_class = content["data"]["class_path"].split(".")[-1]
    args = ["--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.accumulate_grad_batches", "1"]
    if data_class == "CIFARDataModule":
        return args + ["--data.root", str(data_roots["cifar"]), "--data.val_size", "4", "--data.batch_size", "4"]
    args += ["--data.root", str(data_roots["imagenet"]), "--data.batch_size", "2", "--data.image_size", "32"]
    options = dict(content["model"]["init_args"].get("backbone_options") or {})
    if options.get("pretrained"):
        options["pretrained"] = str(weights)  # a local timm state dict instead of a download
        args += ["--model.init_args.backbone_options", json.dumps(options)]
    return args


@pytest.mark.parametrize("config", CLASSIFICATION_CONFIGS, ids=IDS)
def test_config_trains_one_batch(config, data_roots, vit_small_weights, in_tmp, capsys):
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1",
          *small_run_overrides(config, data_roots, vit_small_weights)])
    out = capsys.readouterr().out
    assert "Validation accuracy" in out  # the task's end-of-fit summary: a validation batch ran
    # Relative output paths (checkpoints/, lightning_logs/, predictions/) resolve in the run directory.
    assert not (CONFIGS.parent / "checkpoints" / config.stem).exists()
