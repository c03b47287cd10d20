"""The `lattn` command's errors: one line naming what was wrong, the traceback only with LATTN_DEBUG=1."""

import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

from lattn_app.callbacks import write_atomically
from lattn_app.cli import LattnCLI, console_main, main
from lattn_app.data.cache import build_once

QUICKSTART = "configs/classification_quickstart.yaml"


def lattn(monkeypatch, capsys, *args):
    """Run the console command in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lattn", *args])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    return exit_info.value.code, capsys.readouterr().err


def test_no_arguments_prints_help_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "commands:" in out and "bench" in out and "LATTN_DEBUG" in out


def test_unknown_command_suggests_the_closest_one(monkeypatch, capsys):
    code, err = lattn(monkeypatch, capsys, "fitt")
    assert code == 2
    assert "lattn: error: unknown command 'fitt'; did you mean 'fit'?" in err and "list, bench" in err


def test_an_option_error_from_the_datamodule_is_one_line(tmp_path, monkeypatch, capsys):
    """jsonargparse wraps the datamodule's error in a Union-subtypes dump; the user sees ours, one line."""
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LATTN_DEBUG", raising=False)
    code, err = lattn(monkeypatch, capsys, "fit", "--config", QUICKSTART, "--data.init_args.batch_size", "-1")
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("lattn: error:")] == [
        "lattn: error: ImageFolderDataModule: batch_size must be a positive integer; got -1"]
    assert "Traceback" not in err and "Union" not in err
    monkeypatch.setenv("LATTN_DEBUG", "1")  # the whole traceback instead
    monkeypatch.setattr(sys, "argv", ["lattn", "fit", "--config", QUICKSTART, "--data.init_args.batch_size", "-1"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        console_main()


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, monkeypatch, capsys):
    """PyYAML's own message says "<unicode string>"; the user needs the file (an extended base included)."""
    monkeypatch.delenv("LATTN_DEBUG", raising=False)
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  class_path: StereoTask\n  init_args:\n    lr: [0.1\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("extends: base.yaml\nmodel:\n  init_args:\n    lr: 0.2\n")
    code, err = lattn(monkeypatch, capsys, "fit", "--config", str(overlay))
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("lattn: error:")] == [
        f"lattn: error: {base}, line 5, column 1: not valid YAML (expected ',' or ']', but got '<stream end>', "
        "while parsing a flow sequence at line 4, column 9)"]
    assert "<unicode string>" not in err


def test_a_misspelled_key_in_a_config_file_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """jsonargparse would print its usage and a Union dump without the file; the overlay's class comes from its base."""
    monkeypatch.delenv("LATTN_DEBUG", raising=False)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"extends: {Path(QUICKSTART).resolve()}\ndata:\n  init_args:\n    batchsize: 2\n")
    code, err = lattn(monkeypatch, capsys, "fit", "--config", str(overlay))
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("lattn: error:")] == [
        f"lattn: error: {overlay}: data.init_args.batchsize is not an option of ImageFolderDataModule; "
        "did you mean 'batch_size'?"]
    assert "usage:" not in err


@pytest.mark.parametrize(("words", "message"), [
    (["--data.batchsize", "2"],
     "--data.batchsize is not an option of ImageFolderDataModule; did you mean 'batch_size'?"),
    (["--model.init_args.lrr=0.1"], "--model.init_args.lrr is not an option of ClassificationTask; did you mean 'lr'?"),
    (["--data", "ImageFolderDataModule", "--data.init_args.num_worker", "0"],
     "--data.init_args.num_worker is not an option of ImageFolderDataModule; did you mean 'num_workers'?"),
])
def test_a_misspelled_key_on_the_command_line_is_one_line(words, message, monkeypatch, capsys):
    monkeypatch.delenv("LATTN_DEBUG", raising=False)
    code, err = lattn(monkeypatch, capsys, "fit", "--config", QUICKSTART, *words)
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("lattn: error:")] == [f"lattn: error: {message}"]
    assert "usage:" not in err


def test_correct_command_line_keys_pass_the_check():
    from lattn_app.cli import check_command_line_keys
    from lattn_app.data import SceneFlowDataModule
    from lattn_app.tasks import StereoTask

    classes = {"model": StereoTask, "data": SceneFlowDataModule}
    check_command_line_keys(["fit", "--model.net.num_hourglasses", "1", "--model.help", "StereoTask",
                             "--data.init_args.crop_size=whole", "--model.class_path", "StereoTask",
                             "--trainer.max_epochs", "1"], classes)


def test_unwritable_cache_folder_names_the_folder_and_the_variable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=rf"cannot write the test set into {blocker}/cache: .*set LATTN_CACHE_DIR"):
        build_once(blocker / "cache", "set", lambda folder: None, "test set")


def test_a_failed_write_says_why_in_one_line_and_keeps_the_previous_file(tmp_path):
    """A full disk seen as torch.save's "unexpected pos": here the same failure by a file-size limit."""
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous checkpoint")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        with pytest.raises(OSError) as error:
            write_atomically(path, lambda file: torch.save({"weights": torch.zeros(100_000)}, file))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert str(error.value) == f"[Errno 27] could not write {path}: File too large; the previous file is kept"
    assert path.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_an_integer_batch_limit_means_that_many_batches(tmp_path):
    """`--trainer.limit_val_batches 1` is one batch (the parser alone makes it 1.0: every batch)."""
    from tests.test_cli import BORING_DATA, BORING_MODEL

    cli = LattnCLI(args=["--model", BORING_MODEL, "--data", BORING_DATA,
                         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                         "--trainer.limit_test_batches", "0.5", "--trainer.default_root_dir", str(tmp_path)],
                   run=False)
    assert cli.trainer.limit_val_batches == 1 and isinstance(cli.trainer.limit_val_batches, int)
    assert cli.trainer.limit_train_batches == 2 and isinstance(cli.trainer.limit_train_batches, int)
    assert cli.trainer.limit_test_batches == 0.5  # a fraction stays a fraction
