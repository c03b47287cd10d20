"""StereoTask through the `lattn` command: every Scene Flow config runs, fit -> test -> predict works."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lattn_app.cli import LattnCLI, main
from lattn_app.data.io import read_disparity_png16, read_pfm
from lattn_app.data.synthetic_stereo import ensure_synthetic_sceneflow
from lightning.pytorch import Trainer

from lattn_app.data.stereo import SceneFlowDataModule
from lattn_app.models.stereo import StereoNetOptions
from lattn_app.tasks.stereo import StereoTask, mean_disparity_baseline

# The attention stereo network's configs; the PSMNet ones run in tests/test_models_psmnet.py.
CONFIGS = sorted(path for path in Path(__file__).resolve().parents[1].glob("configs/sceneflow_*.yaml")
                 if "psmnet" not in path.stem)
# Small enough for a 2-core CPU: 64 x 128 images, disparities < 28, max_disparity 32.
TINY_SET = dict(height=64, width=128, train_sequences=3, test_sequences=1, frames_per_sequence=3,
                min_disparity=2.0, max_disparity=28.0)
SMALL_MODEL = ["--model.net.feature_dim", "16", "--model.net.groups", "4", "--model.net.volume_channels", "8",
               "--model.net.num_hourglasses", "1", "--model.net.img_size", "[64, 128]"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return ensure_synthetic_sceneflow(tmp_path_factory.mktemp("cache"), **TINY_SET)


def data_args(root: Path) -> list[str]:
    return ["--data.root", str(root), "--data.subsets", "[flyingthings3d]", "--model.max_disparity", "32",
            "--data.crop_size", "[64, 128]", "--data.batch_size", "2", "--data.num_workers", "0",
            "--data.val_fraction", "0.34"]


def test_there_is_a_config_per_compared_mechanism():
    names = {path.stem for path in CONFIGS}
    assert {f"sceneflow_{m}" for m in ("efficient", "softmax", "performer", "nystrom", "care", "coupling")} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_sceneflow_config_runs_one_batch(config, tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write logs and checkpoints relative to the working directory
    main(["fit", "--config", str(config), *data_args(tiny_root), *SMALL_MODEL, "--trainer.fast_dev_run", "1"])


def test_fit_test_predict_as_a_user_runs_them(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs/sceneflow_efficient.yaml")
    common = ["--config", config, *data_args(tiny_root), *SMALL_MODEL]
    main(["fit", *common, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2"])
    out = capsys.readouterr().out
    assert "Validation EPE" in out and "trivial baseline" in out
    best = tmp_path / "checkpoints/sceneflow_efficient/best.ckpt"
    assert best.is_file() and (tmp_path / "checkpoints/sceneflow_efficient/last.ckpt").is_file()
    assert list((tmp_path / "lightning_logs/sceneflow_efficient").glob("version_*/events.out.tfevents.*"))

    # The checkpoint rebuilds the model alone, with the linked max_disparity.
    restored = StereoTask.load_from_checkpoint(best)
    assert restored.max_disparity == 32 and restored.hparams.attention == "efficient"

    main(["test", *common, "--ckpt_path", str(best)])
    out = capsys.readouterr().out
    for key in ("test_epe", "test_bad1", "test_bad2", "test_bad3", "test_d1", "test_baseline_epe"):
        assert key in out
    # ... and saves them as JSON next to the logs, naming the checkpoint.
    (written,) = (tmp_path / "lightning_logs/sceneflow_efficient").glob("version_*/test_metrics.json")
    record = json.loads(written.read_text())
    assert record["ckpt_path"] == str(best) and 0 <= record["metrics"]["test_bad3"] <= record["metrics"]["test_bad1"] <= 1

    # A pair of arbitrary size (not a multiple of anything) -> PFM, 16-bit PNG and colour PNG of that size.
    rng = np.random.default_rng(0)
    pair = []
    for view in ("left", "right"):
        path = tmp_path / f"pair_{view}.png"
        Image.fromarray(rng.integers(0, 255, (50, 74, 3), dtype=np.uint8)).save(path)
        pair.append(str(path))
    main(["predict", *common, "--ckpt_path", str(best), "--data.predict_pairs", f"[[{pair[0]}, {pair[1]}]]"])
    out_dir = tmp_path / "predictions/sceneflow_efficient"
    disparity = read_pfm(out_dir / "pair_left.pfm")
    assert disparity.shape == (50, 74) and np.isfinite(disparity).all()
    np.testing.assert_allclose(read_disparity_png16(out_dir / "pair_left_disp16.png"), disparity, atol=1 / 256)
    assert np.asarray(Image.open(out_dir / "pair_left_color.png")).shape == (50, 74, 3)


def test_baseline_predicts_each_images_mean_valid_disparity():
    target = torch.tensor([[[2.0, 4.0, 0.0, 100.0]], [[10.0, 10.0, 10.0, 10.0]]])
    baseline = mean_disparity_baseline(target, 48)
    assert torch.all(baseline[0] == 3.0) and torch.all(baseline[1] == 10.0)


def test_nonfinite_loss_stops_with_the_step_named_or_skips(tiny_root):
    net = StereoNetOptions(feature_dim=16, groups=4, volume_channels=8, num_hourglasses=1, img_size=(64, 128))
    task = StereoTask(max_disparity=32, backbone_options={"num_stages": 2}, net=net)
    batch = {"left": torch.full((1, 3, 64, 128), math.nan), "right": torch.rand(1, 3, 64, 128),
             "disparity": torch.full((1, 64, 128), 5.0)}
    with pytest.raises(FloatingPointError, match="global step 0"):
        task.training_step(batch, 0)
    skipping = StereoTask(max_disparity=32, backbone_options={"num_stages": 2}, net=net, on_nonfinite_loss="skip")
    assert skipping.training_step(batch, 0) is None


def test_max_disparity_is_the_models_and_unset_comes_from_the_data(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs/sceneflow_efficient.yaml")
    cli = LattnCLI(args=["--config", config, *data_args(tiny_root), *SMALL_MODEL], run=False)
    assert cli.model.max_disparity == cli.model.net.max_disparity == 32  # set in the config: it governs
    assert cli.model.fill_from_data(cli.datamodule) == {} and cli.model.max_disparity == 32
    assert cli.datamodule.disparity_range is None  # real Scene Flow states no range
    unset = [arg for arg in data_args(tiny_root) if arg not in ("--model.max_disparity", "32")]
    real = LattnCLI(args=["--config", config, *unset, *SMALL_MODEL], run=False)
    assert real.model.max_disparity is None
    assert real.model.fill_from_data(real.datamodule) == {"max_disparity": 192}  # PSMNet's range
    embedded = LattnCLI(args=["--config", config, *SMALL_MODEL], run=False)  # root unset: the embedded set
    assert embedded.datamodule.disparity_range == 48
    assert embedded.model.fill_from_data(embedded.datamodule) == {"max_disparity": 48}
    assert embedded.model.max_disparity == embedded.model.net.max_disparity == embedded.model.hparams.max_disparity == 48
    assert embedded.model.val_metrics["epe"].max_disparity == 48


def test_an_unset_max_disparity_is_recorded_and_then_taken_from_the_checkpoint(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs/sceneflow_efficient.yaml")
    unset = [arg for arg in data_args(tiny_root) if arg not in ("--model.max_disparity", "32")]
    main(["fit", "--config", config, *unset, *SMALL_MODEL, "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"])
    saved = next((tmp_path / "lightning_logs/sceneflow_efficient").glob("version_*/config.yaml")).read_text()
    assert "max_disparity: 192" in saved  # the config saved with the run says what the model used
    checkpoint = torch.load(tmp_path / "checkpoints/sceneflow_efficient/last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["max_disparity"] == 192
    assert "max_disparity: 192" in checkpoint["lattn"]["config"]
    task = StereoTask(**{k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")
                         and k != "max_disparity"})
    assert task.max_disparity is None
    task.on_load_checkpoint(checkpoint)  # what `lattn test/predict --ckpt_path` does without the option
    assert task.max_disparity == task.net.max_disparity == 192

    # Predicting with data that states another range (root unset: the embedded set's 48) keeps the checkpoint's.
    left = next(tiny_root.glob("FlyingThings3D/frames_cleanpass/TEST/*/*/left/*.png"))
    data = SceneFlowDataModule(root=None, predict_pairs=[[str(left), str(left.parents[1] / "right" / left.name)]],
                               num_workers=0, eval_batch_size=1)
    assert data.disparity_range == 48
    fresh = StereoTask(**{k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")
                          and k != "max_disparity"})
    Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False).predict(
        fresh, datamodule=data, ckpt_path=tmp_path / "checkpoints/sceneflow_efficient/last.ckpt")
    assert fresh.max_disparity == fresh.net.max_disparity == 192


@pytest.mark.slow
def test_main_job_reaches_a_third_of_the_trivial_baseline(tmp_path, monkeypatch, capsys):
    """The README's main job as a user runs it (about 7 minutes on a 2-core CPU)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "cache"))
    main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs/sceneflow_efficient.yaml")])
    out = capsys.readouterr().out
    match = re.search(r"Validation EPE ([\d.]+) px; trivial baseline \(each image's mean disparity\) ([\d.]+) px", out)
    assert match, out[-2000:]
    epe, baseline = float(match.group(1)), float(match.group(2))
    assert epe <= baseline / 3
    assert (tmp_path / "checkpoints/sceneflow_efficient/best.ckpt").is_file()
