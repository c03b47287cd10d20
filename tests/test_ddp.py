"""DDP on the CPU: every task trains with 2 processes (gloo), and `lattn test` on 2 processes reports the
same metrics as on 1, on test sets whose size does not divide by 2 (no sample counted twice or dropped).

The 2-process runs are `python -m lattn_app ...` subprocesses, as a user launches them: Lightning's DDP
launcher starts the second process by running the same command line again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lattn_app.cli import main
from lattn_app.data.synthetic_classification import ensure_synthetic_classification
from lattn_app.data.synthetic_coco import ensure_synthetic_coco
from lattn_app.data.synthetic_stereo import ensure_synthetic_sceneflow

REPO = Path(__file__).resolve().parents[1]
TWO_PROCESSES = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def classification_args(root: Path) -> list[str]:
    return ["--config", str(REPO / "configs/classification_quickstart.yaml"), "--data.root", str(root),
            "--data.num_workers", "0", "--data.batch_size", "4", "--model.backbone_options.depth", "1"]


def stereo_args(root: Path) -> list[str]:
    return ["--config", str(REPO / "configs/sceneflow_efficient.yaml"), "--data.root", str(root),
            "--data.subsets", "[flyingthings3d]", "--model.max_disparity", "32", "--data.crop_size", "[64, 128]",
            "--data.batch_size", "1", "--data.num_workers", "0", "--data.val_fraction", "0.34",
            "--model.net.feature_dim", "16", "--model.net.groups", "4", "--model.net.volume_channels", "8",
            "--model.net.num_hourglasses", "1", "--model.net.img_size", "[64, 128]",
            "--model.backbone_options.num_stages", "2"]


def detection_args(root: Path) -> list[str]:
    return ["--config", str(REPO / "configs/coco_quickstart.yaml"), "--data.root", str(root),
            "--data.test_json", "annotations/instances_test2017.json", "--data.test_images", "test2017",
            "--data.image_size", "96", "--data.batch_size", "2", "--data.num_workers", "0",
            "--model.net.neck_channels", "32", "--model.net.box_head_dim", "64", "--model.net.mask_head_channels", "16",
            "--model.net.box_batch_size_per_image", "32", "--model.net.rpn_batch_size_per_image", "32"]


def classification_root(cache: Path) -> Path:
    root = ensure_synthetic_classification(cache, image_size=32, train_per_class=2, val_per_class=1,
                                           test_per_class=2)
    # 10 classes x 2 = 20 test images; one fewer makes the split odd (a real ImageFolder of any size).
    sorted((root / "test").glob("*/*"))[0].unlink()
    return root


def stereo_root(cache: Path) -> Path:
    # 3 test frames; training: 6 frames, 2 of them held out for validation
    return ensure_synthetic_sceneflow(cache, height=64, width=128, train_sequences=3, test_sequences=1,
                                      frames_per_sequence=3, min_disparity=2.0, max_disparity=28.0)


def detection_root(cache: Path) -> Path:
    return ensure_synthetic_coco(cache, train_images=8, val_images=3, test_images=5)


TASKS = {
    "classification": (classification_root, classification_args, "classification_quickstart", 19),
    "stereo": (stereo_root, stereo_args, "sceneflow_efficient", 3),
    "detection": (detection_root, detection_args, "coco_quickstart", 5),
}


def lattn(folder: Path, *args: str) -> None:
    """`python -m lattn_app ARGS` in `folder`, one thread per process; fails the test with its output."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "lattn_app", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, f"lattn {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_metrics(folder: Path, run_name: str) -> dict[str, float]:
    (written,) = (folder / "lightning_logs" / run_name).glob("version_*/test_metrics.json")
    return json.loads(written.read_text())["metrics"]


test_metrics.__test__ = False  # a helper, not a test


# About 38-50 s each on 2 cores. The default suite runs detection's (DDP training, and COCO mAP, the metric
# hardest to synchronise); classification's and stereo's metrics are plain sums, and their runs are kept for
# -m slow so that the default suite stays within its 10 minutes.
SLOW_DDP_TASKS = {"stereo", "classification"}


@pytest.mark.parametrize("task", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_DDP_TASKS else [])
                                  for name in TASKS])
def test_two_process_ddp_trains_and_tests_like_one_process(task, tmp_path, monkeypatch):
    make_root, task_args, run_name, test_size = TASKS[task]
    root = make_root(tmp_path / "data")
    args = task_args(root)

    lattn(tmp_path / "fit", "fit", *args, *QUIET, *TWO_PROCESSES, "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1")
    checkpoint = tmp_path / "fit/checkpoints" / run_name / "last.ckpt"
    assert checkpoint.is_file(), "the 2-process fit wrote no last.ckpt"

    lattn(tmp_path / "two", "test", *args, *QUIET, *TWO_PROCESSES, "--ckpt_path", str(checkpoint))
    (tmp_path / "one").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    main(["test", *args, *QUIET, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
          "--ckpt_path", str(checkpoint)])

    one, two = test_metrics(tmp_path / "one", run_name), test_metrics(tmp_path / "two", run_name)
    assert one.keys() == two.keys() and len(one) >= 2
    for name, value in one.items():
        if float(value).is_integer():  # counts
            assert two[name] == value, f"{name}: 2 processes {two[name]}, 1 process {value}"
        else:  # means
            assert two[name] == pytest.approx(value, rel=1e-6, abs=1e-6), f"{name}: {two[name]} vs {value}"
    assert test_size % 2 == 1
