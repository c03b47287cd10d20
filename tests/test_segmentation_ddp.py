"""DDP on the CPU for segmentation: `lattn test` on 2 processes (gloo) reports the mIoU, pixel accuracy and
every per-class IoU of 1 process, on a test split of 5 images (odd: the shares are 3 and 2, and no image
is counted twice or dropped). The 2-process run is a `python -m lattn_app ...` subprocess, as a user
launches it (tests/test_ddp.py's pattern)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lattn_app.cli import main
from lattn_app.data.synthetic_segmentation import ensure_synthetic_ade20k
from tests.test_ddp import QUIET, TWO_PROCESSES, lattn, test_metrics

REPO = Path(__file__).resolve().parents[1]
RUN = "segmentation_quickstart"


@pytest.mark.slow  # about 30 s: two `python -m lattn_app` processes start on a shared 2-core CPU
def test_two_process_test_equals_one_process_on_an_odd_split(tmp_path, monkeypatch):
    root = ensure_synthetic_ade20k(tmp_path / "data", train_images=8, val_images=5)
    args = ["--config", str(REPO / f"configs/{RUN}.yaml"), "--data.root", str(root), "--data.val_size", "2",
            "--data.crop_size", "32", "--data.scale_size", "48", "--data.batch_size", "2", "--data.eval_batch_size", "2",
            "--data.num_workers", "0", "--model.net.neck_channels", "32", "--model.net.head_channels", "16"]
    (tmp_path / "one").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    main(["fit", *args, *QUIET, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
          "--trainer.limit_val_batches", "1"])
    checkpoint = tmp_path / "one/checkpoints" / RUN / "last.ckpt"
    main(["test", *args, *QUIET, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--ckpt_path", str(checkpoint)])
    lattn(tmp_path / "two", "test", *args, *QUIET, *TWO_PROCESSES, "--ckpt_path", str(checkpoint))

    one, two = test_metrics(tmp_path / "one", RUN), test_metrics(tmp_path / "two", RUN)
    assert one.keys() == two.keys() and {"test_miou", "test_pixel_acc", "test_baseline_miou"} <= one.keys()
    assert any(name.startswith("test_iou/") for name in one)
    for name, value in one.items():
        assert two[name] == pytest.approx(value, rel=1e-6, abs=1e-6), f"{name}: 2 processes {two[name]}, 1 process {value}"
