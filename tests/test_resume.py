"""Never lose a run: atomic checkpoints, an exact resume after SIGKILL, NaN handling, and checkpoints that
know what they were trained as.

The resume test runs `lattn fit` as a user does (a subprocess), kills it with SIGKILL mid-epoch, resumes
it with `--ckpt_path last`, kills the resumed run right after an epoch-end checkpoint, resumes again, and
compares every tensor of the final checkpoint with an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from lattn_app.callbacks import AtomicCheckpointIO, remove_partial_files, write_atomically
from lattn_app.cli import main
from lattn_app.data.synthetic_stereo import ensure_synthetic_sceneflow
from lattn_app.tasks.stereo import StereoTask

REPO = Path(__file__).resolve().parents[1]
STEREO_CONFIG = REPO / "configs/sceneflow_efficient.yaml"
CLASSIFICATION_CONFIG = REPO / "configs/classification_quickstart.yaml"
# 9 training frames of 64 x 128 pixels in 3 sequences; one sequence is held out for validation, so an
# epoch is 6 optimiser steps at batch size 1.
TINY_SET = dict(height=64, width=128, train_sequences=3, test_sequences=1, frames_per_sequence=3,
                min_disparity=2.0, max_disparity=28.0)
STEPS_PER_EPOCH = 6
LAST_EVERY = 2  # last.ckpt every 2 optimiser steps
SMALL_MODEL = ["--model.net.feature_dim", "16", "--model.net.groups", "4", "--model.net.volume_channels", "8",
               "--model.net.num_hourglasses", "1", "--model.net.img_size", "[64, 128]"]


class KillAtStep(Callback):
    """Test only: the process SIGKILLs itself at the end of optimiser step `step` (before that step's checkpoint:
    Lightning runs checkpoint callbacks last)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NaNLossAtStep(StereoTask):
    """Test only: the training loss is NaN at optimiser step `nan_at_step`."""

    def __init__(self, nan_at_step: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_at_step = nan_at_step

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        loss = super().training_loss(batch)
        return loss * math.nan if self.global_step == self.nan_at_step else loss


class NaNGradientAtStep(StereoTask):
    """Test only: at optimiser step `nan_at_step` a finite loss has NaN gradients (sqrt'(0) = inf, times 0)."""

    def __init__(self, nan_at_step: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_at_step = nan_at_step

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        loss = super().training_loss(batch)
        if self.global_step == self.nan_at_step:
            loss = loss + (next(self.parameters()).sum() * 0).sqrt()
        return loss


@pytest.fixture(scope="module")
def stereo_root(tmp_path_factory) -> Path:
    return ensure_synthetic_sceneflow(tmp_path_factory.mktemp("cache"), **TINY_SET)


def stereo_args(root: Path, num_workers: int = 0) -> list[str]:
    return ["--config", str(STEREO_CONFIG), "--config", "run.yaml", "--data.root", str(root),
            "--data.subsets", "[flyingthings3d]", "--model.max_disparity", "32", "--data.crop_size", "[64, 128]",
            "--data.batch_size", "1", "--data.num_workers", str(num_workers), "--data.val_fraction", "0.34",
            *SMALL_MODEL]


def write_run_config(folder: Path, kill_at_step: int | None = None, deterministic: bool | None = None) -> None:
    """run.yaml, given after the Scene Flow config: checkpoints every 2 steps, stochastic depth (so that the
    random generators matter), two epochs, no logger; optionally a kill at a step."""
    callbacks = [{"class_path": "LattnCheckpoint",
                  "init_args": {"dirpath": "checkpoints", "filename": "best", "monitor": "val_epe", "mode": "min",
                                "last_every_n_steps": LAST_EVERY}}]
    if kill_at_step is not None:
        callbacks.append({"class_path": "tests.test_resume.KillAtStep", "init_args": {"step": kill_at_step}})
    trainer = {"callbacks": callbacks, "logger": False, "max_epochs": 2, "enable_progress_bar": False,
               "enable_model_summary": False}
    if deterministic is not None:
        trainer["deterministic"] = deterministic
    config = {"trainer": trainer,
              "model": {"init_args": {"backbone_options": {"num_stages": 2, "drop_path_rate": 0.2}}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(config))


def lattn_fit(folder: Path, root: Path, *extra: str, kill_at_step: int | None = None,
              num_workers: int = 0) -> subprocess.CompletedProcess:
    """`python -m lattn_app fit ...` in `folder`, deterministic, on one thread."""
    write_run_config(folder, kill_at_step, deterministic=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "lattn_app", "fit", *stereo_args(root, num_workers), *extra],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: Any, b: Any, where: str) -> None:
    """Nested dicts / lists / tensors / numbers equal exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(resumed: dict[str, Any], reference: dict[str, Any]) -> None:
    assert (resumed["global_step"], resumed["epoch"]) == (reference["global_step"], reference["epoch"])
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_tensors(resumed[key], reference[key], key)
    assert_same_tensors(resumed["lattn"]["rng_states"], reference["lattn"]["rng_states"], "rng_states")
    assert_same_tensors(resumed["SceneFlowDataModule"], reference["SceneFlowDataModule"], "data position")
    (resumed_callback,), (reference_callback,) = resumed["callbacks"].values(), reference["callbacks"].values()
    assert_same_tensors(resumed_callback["best_model_score"], reference_callback["best_model_score"], "best val_epe")


def validate_metrics(folder: Path, root: Path, checkpoint: Path, monkeypatch) -> dict[str, float]:
    monkeypatch.chdir(folder)
    write_run_config(folder)
    main(["validate", *stereo_args(root), "--ckpt_path", str(checkpoint)])
    return json.loads((folder / "validate_metrics.json").read_text())["metrics"]


def test_a_run_killed_twice_and_resumed_ends_exactly_as_an_uninterrupted_run(stereo_root, tmp_path, monkeypatch):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    uninterrupted = lattn_fit(reference_dir, stereo_root)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    # Killed mid-epoch 0 at step 5: last.ckpt is the periodic one of step 4, four batches into the epoch.
    killed = lattn_fit(run_dir, stereo_root, kill_at_step=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = load(run_dir / "checkpoints/last.ckpt")
    assert last["global_step"] == 4 and last["epoch"] == 0
    assert last["SceneFlowDataModule"]["train_loader"] == {"epoch": 0, "batches_done": 4, "seed": 42}

    # Resumed (with a data-loader worker this time), killed again one step after the end of epoch 0:
    # last.ckpt is then the one written at the epoch end, after validation.
    resumed = lattn_fit(run_dir, stereo_root, "--ckpt_path", "last", kill_at_step=STEPS_PER_EPOCH + 1, num_workers=1)
    assert resumed.returncode == -signal.SIGKILL, resumed.stderr[-3000:]
    last = load(run_dir / "checkpoints/last.ckpt")
    assert last["global_step"] == STEPS_PER_EPOCH and last["epoch"] == 0
    assert "ckpt_path: last" in last["lattn"]["config"]

    finished = lattn_fit(run_dir, stereo_root, "--ckpt_path", "last")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "not resumable" not in finished.stderr  # Lightning's warning for loaders that restart the epoch

    for name in ("last.ckpt", "best.ckpt"):
        assert_same_training_state(load(run_dir / "checkpoints" / name), load(reference_dir / "checkpoints" / name))
    assert load(run_dir / "checkpoints/last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH
    assert not list((run_dir / "checkpoints").glob(".*"))  # no partial files left behind
    assert (validate_metrics(run_dir, stereo_root, run_dir / "checkpoints/last.ckpt", monkeypatch)
            == validate_metrics(reference_dir, stereo_root, reference_dir / "checkpoints/last.ckpt", monkeypatch))


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(stereo_root, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run_config(tmp_path)
    with pytest.raises(FloatingPointError, match="the training loss is nan at global step 5 "):
        main(["fit", *stereo_args(stereo_root), "--model.class_path", "tests.test_resume.NaNLossAtStep",
              "--model.init_args.nan_at_step", "5"])
    last = load(tmp_path / "checkpoints/last.ckpt")
    assert last["global_step"] == 4
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())


def test_nan_weights_from_a_finite_loss_are_never_written(stereo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run_config(tmp_path)
    # Step 3 makes the weights NaN; the checkpoint due after it (step 4) is refused, step 2's stays.
    with pytest.raises(FloatingPointError, match=r"weights are not finite at global step 4 .*still holds step 2"):
        main(["fit", *stereo_args(stereo_root), "--model.class_path", "tests.test_resume.NaNGradientAtStep",
              "--model.init_args.nan_at_step", "3"])
    last = load(tmp_path / "checkpoints/last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())


# ------------------------------------------------------------------------------------ atomic writing


def test_an_interrupted_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def write_half_then_die(file) -> None:
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, write_half_then_die)
    assert load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


WRITE_FOREVER = """
import sys, torch
from lattn_app.callbacks import AtomicCheckpointIO
io, step = AtomicCheckpointIO(), 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "weights": torch.full((2_000_000,), float(step))}, sys.argv[1])
    if step == 1:
        print("written", flush=True)
"""


def test_sigkill_during_writes_leaves_a_complete_checkpoint(tmp_path):
    """A process that writes an 8 MB checkpoint over and over is killed at some moment; the file is whole."""
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=REPO)
    try:
        assert writer.stdout.readline().strip() == "written"
        time.sleep(0.5)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    checkpoint = load(path)
    assert checkpoint["step"] >= 1
    assert torch.equal(checkpoint["weights"], torch.full((2_000_000,), float(checkpoint["step"])))
    remove_partial_files(tmp_path)  # what the next run does with a write the kill interrupted
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------------- what a checkpoint was trained as


@pytest.fixture(scope="module")
def stereo_checkpoint(stereo_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stereo_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        write_run_config(folder)
        main(["fit", *stereo_args(stereo_root), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    return folder / "checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def classification_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classification_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("LATTN_CACHE_DIR", str(folder / "cache"))
        main(["fit", "--config", str(CLASSIFICATION_CONFIG), "--trainer.enable_progress_bar", "false",
              "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
              "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.callbacks",
              "[{class_path: LattnCheckpoint, init_args: {dirpath: checkpoints, monitor: val_acc, mode: max}}]"])
    return folder / "checkpoints/last.ckpt"


def test_a_checkpoint_records_the_task_and_the_config_it_was_trained_with(stereo_checkpoint):
    record = load(stereo_checkpoint)["lattn"]
    assert record["task"] == "StereoTask"
    assert record["config_files"] == [str(STEREO_CONFIG), "run.yaml"]
    config = yaml.safe_load(record["config"])
    assert config["model"]["class_path"] == "lattn_app.tasks.StereoTask"
    model = config["model"]["init_args"]
    assert model["attention"] == "efficient" and model["net"]["feature_dim"] == 16
    assert config["trainer"]["callbacks"][0]["init_args"]["last_every_n_steps"] == LAST_EVERY


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_a_checkpoint_of_another_task_says_what_differs(subcommand, classification_checkpoint, stereo_root,
                                                                   tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run_config(tmp_path)
    pair = next(stereo_root.rglob("left/*.png"))
    predict = ["--data.predict_pairs", f"[[{pair}, {pair.parent.parent / 'right' / pair.name}]]"]
    expected = (r"trained as ClassificationTask with backbone vit/efficient; this config builds StereoTask with "
                r"backbone pyramid_tiny/efficient\. Differences \(checkpoint -> this config\): task: "
                r"'ClassificationTask' -> 'StereoTask'; backbone: 'vit' -> 'pyramid_tiny'\. Use the config it was "
                r"trained with: --config \S*configs/classification_quickstart\.yaml")
    with pytest.raises(ValueError, match=expected):
        main([subcommand, *stereo_args(stereo_root), *(predict if subcommand == "predict" else []),
              "--ckpt_path", str(classification_checkpoint)])


def test_load_from_checkpoint_of_another_task_says_what_differs(classification_checkpoint, stereo_checkpoint):
    with pytest.raises(ValueError, match=r"trained as ClassificationTask with backbone vit/efficient; "
                                         r"StereoTask.load_from_checkpoint builds StereoTask .* Load it with "
                                         r"ClassificationTask\.load_from_checkpoint"):
        StereoTask.load_from_checkpoint(classification_checkpoint)
    with pytest.raises(ValueError, match="attention: 'efficient' -> 'softmax'"):
        StereoTask.load_from_checkpoint(stereo_checkpoint, attention="softmax")
    assert StereoTask.load_from_checkpoint(stereo_checkpoint).hparams.net["feature_dim"] == 16  # a fitting one loads


@pytest.mark.parametrize(("option", "difference"), [
    (["--model.attention", "softmax"], r"attention: 'efficient' -> 'softmax'"),
    (["--model.backbone", "pyramid"], r"backbone: 'pyramid_tiny' -> 'pyramid'"),
    (["--model.net.feature_dim", "24"], r"feature_dim: 16 -> 24\. Weights: \d+ weights of another shape"),
], ids=["attention", "backbone", "weight_shapes"])
def test_a_checkpoint_of_another_architecture_says_what_differs(option, difference, stereo_checkpoint, stereo_root,
                                                                tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run_config(tmp_path)
    with pytest.raises(ValueError, match=difference):
        main(["test", *stereo_args(stereo_root), *option, "--ckpt_path", str(stereo_checkpoint)])
