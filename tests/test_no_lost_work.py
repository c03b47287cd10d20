"""No silent wrong results and no overwritten work: what `lattn` refuses before it does something else.

- `validate`/`test`/`predict` without `--ckpt_path` would run random weights: refused unless `--untrained true`;
- a new `fit` into a folder holding an earlier run's checkpoints: refused unless resuming or `--overwrite true`;
- an unwritable checkpoint folder: refused before training, not at the first write;
- `fit --ckpt_path last` with no `last.ckpt`: refused, naming the folder searched (Lightning would train
  from scratch);
- `predict` into a folder holding an earlier run's predictions: refused unless `--overwrite true`; two
  inputs of one run that map to the same output file: refused, naming both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lattn_app.cli import main
from lattn_app.data.synthetic_stereo import ensure_synthetic_sceneflow

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/sceneflow_efficient.yaml")
TINY_SET = dict(height=64, width=128, train_sequences=3, test_sequences=1, frames_per_sequence=3,
                min_disparity=2.0, max_disparity=28.0)
SMALL = ["--model.net.feature_dim", "16", "--model.net.groups", "4", "--model.net.volume_channels", "8",
         "--model.net.num_hourglasses", "1", "--model.net.img_size", "[64, 128]", "--model.max_disparity", "32",
         "--data.subsets", "[flyingthings3d]", "--data.crop_size", "[64, 128]", "--data.batch_size", "2",
         "--data.num_workers", "0", "--data.val_fraction", "0.34", "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return ensure_synthetic_sceneflow(tmp_path_factory.mktemp("cache"), **TINY_SET)


def args(root: Path) -> list[str]:
    return ["--config", CONFIG, "--data.root", str(root), *SMALL]


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused_unless_asked_for(subcommand, tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"lattn {subcommand} needs the trained model: pass --ckpt_path"):
        main([subcommand, *args(tiny_root)])
    assert not (tmp_path / "lightning_logs").exists() and not (tmp_path / "predictions").exists()
    if subcommand == "validate":  # asked for explicitly, the untrained model runs
        main([subcommand, *args(tiny_root), "--untrained", "true"])
        assert list((tmp_path / "lightning_logs/sceneflow_efficient").glob("version_*/validate_metrics.json"))


def test_a_new_fit_keeps_an_earlier_runs_checkpoints(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *args(tiny_root)])
    last = tmp_path / "checkpoints/sceneflow_efficient/last.ckpt"
    first = last.read_bytes()
    with pytest.raises(FileExistsError, match=r"sceneflow_efficient holds the checkpoints of an earlier run "
                                              r"\(best.ckpt, last.ckpt\).*--ckpt_path last.*--overwrite true"):
        main(["fit", *args(tiny_root)])
    assert last.read_bytes() == first  # untouched
    main(["fit", *args(tiny_root), "--trainer.max_epochs", "2", "--ckpt_path", "last"])  # resuming is fine
    assert torch.load(last, weights_only=True)["epoch"] == 1
    main(["fit", *args(tiny_root), "--overwrite", "true"])  # so is replacing them when asked
    assert torch.load(last, weights_only=True)["epoch"] == 0
    with pytest.raises(ValueError, match="--untrained applies to validate, test and predict"):
        main(["fit", *args(tiny_root), "--untrained", "true"])


def test_an_unwritable_checkpoint_folder_is_found_before_training(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    folder = tmp_path / "a_file" / "checkpoints"  # cannot be created, even by root
    overlay = tmp_path / "elsewhere.yaml"
    overlay.write_text(f"extends: {CONFIG}\ntrainer:\n  callbacks:\n    - class_path: LattnCheckpoint\n"
                       f"      init_args: {{dirpath: {folder}, monitor: val_epe, mode: min}}\n")
    with pytest.raises(PermissionError, match=rf"checkpoint folder {folder} is not writable.*training has not started"):
        main(["fit", "--config", str(overlay), "--data.root", str(tiny_root), *SMALL])


def test_resuming_with_no_last_checkpoint_is_refused_naming_the_folder(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: there is no last.ckpt in \S*checkpoints/"
                                                r"sceneflow_efficient \(this config's checkpoint folder\)"):
        main(["fit", *args(tiny_root), "--ckpt_path", "last"])
    assert not (tmp_path / "checkpoints/sceneflow_efficient").exists()


def test_a_bad_checkpoint_file_is_named_with_what_is_wrong(tiny_root, tmp_path, monkeypatch):
    from lattn_app.tasks import StereoTask

    monkeypatch.chdir(tmp_path)
    main(["fit", *args(tiny_root)])
    good = (tmp_path / "checkpoints/sceneflow_efficient/last.ckpt").read_bytes()
    empty, truncated, text = tmp_path / "empty.ckpt", tmp_path / "truncated.ckpt", tmp_path / "notes.ckpt"
    empty.write_bytes(b"")
    truncated.write_bytes(good[: len(good) // 2])
    text.write_text("not a checkpoint\n")
    for path, problem in ((empty, "the checkpoint file is empty"), (truncated, "not a complete checkpoint"),
                          (text, "not a complete checkpoint")):
        with pytest.raises(ValueError, match=rf"{path}: {problem}"):
            main(["test", *args(tiny_root), "--ckpt_path", str(path)])
        with pytest.raises(ValueError, match=rf"{path}: {problem}"):
            StereoTask.load_from_checkpoint(path)


def test_predict_never_replaces_an_earlier_runs_predictions_unasked(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = tmp_path / "pairs"
    rng = np.random.default_rng(0)
    for side in ("left", "right"):
        (pairs / side).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(pairs / side / "view.png")
    predict = ["predict", *args(tiny_root), "--untrained", "true", "--data.predict_pairs", str(pairs)]
    main(predict)
    written = tmp_path / "predictions/sceneflow_efficient/left/view.pfm"
    first = written.read_bytes()
    written.write_bytes(b"the user's earlier result")  # what a second run must not replace
    with pytest.raises(FileExistsError, match=r"predictions/sceneflow_efficient/left/view.pfm exists "
                                              r"\(an earlier lattn predict wrote it\).*--overwrite true"):
        main(predict)
    assert written.read_bytes() == b"the user's earlier result"
    main([*predict, "--overwrite", "true"])  # asked for: replaced
    assert written.read_bytes() == first
    for side in ("left", "right"):  # a second pair whose name differs only in its extension
        Image.open(pairs / side / "view.png").save(pairs / side / "view.jpg", quality=95)
    with pytest.raises(ValueError, match=r"two predicted inputs map to \S*left/view.pfm: left/view.jpg and "
                                         r"left/view.png"):
        main([*predict, "--overwrite", "true"])
