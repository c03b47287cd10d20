"""The `lattn` command: LightningCLI subcommands, `lattn list`, version, config saving, seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lattn_app import __version__
from lattn_app.cli import DEFAULT_SEED, main

BORING_MODEL = "lightning.pytorch.demos.boring_classes.BoringModel"
BORING_DATA = "lightning.pytorch.demos.boring_classes.BoringDataModule"


def test_help_names_the_subcommands_and_lattn_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("fit", "validate", "test", "predict", "list", "bench", "LATTN_DEBUG"):
        assert word in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lattn {__version__}"


def test_list_prints_every_mechanism_with_complexity(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name in ("softmax", "efficient", "performer", "linformer", "nystrom", "fnet", "mixer", "coupling", "care"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert "O(" in line
    assert "Backbones" in out


def test_python_m_and_console_script_work():
    for command in ([sys.executable, "-m", "lattn_app", "--help"], [str(Path(sys.executable).parent / "lattn"), "list"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "efficient" in result.stdout or "fit" in result.stdout


def test_fit_saves_its_config_overwriting_and_with_the_fixed_seed(tmp_path):
    args = [
        "fit",
        "--model", BORING_MODEL,
        "--data", BORING_DATA,
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir", str(tmp_path),
        "--trainer.logger.version", "fixed",
    ]
    main(args)
    saved = tmp_path / "lightning_logs" / "fixed" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert config["seed_everything"] == DEFAULT_SEED
    assert config["model"]["class_path"] == BORING_MODEL
    main(args)  # the same run directory again: the saved config is overwritten, not an error
    assert saved.exists()


def test_a_misspelled_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model:\n  class_path: {BORING_MODEL}\ntrainer:\n  max_epoch: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code != 0
    assert "max_epoch" in capsys.readouterr().err


def test_evaluating_a_checkpoint_does_not_reload_the_pretrained_source(tmp_path, monkeypatch):
    """`lattn test --ckpt_path` must work after the pretrained weights file is gone (or offline)."""
    import torch

    from lattn_app.backbones import create_backbone

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "cache"))
    config = str(Path(__file__).resolve().parents[1] / "configs/classification_quickstart.yaml")
    architecture = dict(attention="efficient", img_size=32, patch_size=4, stem="conv", embed_dim=128, depth=4,
                        num_heads=4, mlp_ratio=2.0, class_token=False, global_pool="avg", num_classes=10)
    weights = tmp_path / "pretrained.pth"
    torch.save(create_backbone("vit", **architecture).state_dict(), weights)
    pretrained = ["--model.backbone_options.pretrained", str(weights)]
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.limit_test_batches", "1"]
    main(["fit", "--config", config, *pretrained, *short])
    weights.unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="pretrained weights file"):  # building the model from the config alone needs the file ...
        main(["fit", "--config", config, *pretrained, *short])
    # ... but evaluating a checkpoint takes every weight from the checkpoint.
    main(["test", "--config", config, *pretrained, *short,
          "--ckpt_path", str(tmp_path / "checkpoints/classification_quickstart/best.ckpt")])


def test_list_piped_into_head_ends_quietly():
    done = subprocess.run(f"{sys.executable} -m lattn_app list | head -1", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.startswith("Attention mechanisms") and "Traceback" not in done.stderr, done.stderr


def test_a_config_extends_its_base_and_names_the_run_after_itself(tmp_path, monkeypatch):
    from lattn_app.cli import LattnCLI

    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[1] / "configs"
    cli = LattnCLI(args=["--config", str(configs / "sceneflow_softmax.yaml")], run=False)
    config = cli.config
    assert config.model.init_args.attention == "softmax"  # the overlay's value ...
    assert config.model.init_args.net.feature_dim == 32 and config.trainer.max_epochs == 16  # ... over the base's
    assert [Path(str(path)).name for path in config.config] == ["sceneflow_efficient.yaml", "sceneflow_softmax.yaml"]
    assert config.extends is None  # the saved config is whole
    assert cli.trainer.logger.name == "sceneflow_softmax"
    assert cli.trainer.checkpoint_callback.dirpath.endswith("checkpoints/sceneflow_softmax")
    writer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StereoPredictionWriter")
    assert str(writer.output_dir) == "predictions/sceneflow_softmax"

    # Folders the config names are kept; a chain of overlays is read base first; cycles and missing bases are errors.
    (tmp_path / "mine.yaml").write_text(f"extends: {configs / 'sceneflow_softmax.yaml'}\ntrainer:\n  max_epochs: 3\n"
                                        "  logger:\n    class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
                                        "    init_args:\n      save_dir: logs\n      name: chosen\n")
    mine = LattnCLI(args=["--config", str(tmp_path / "mine.yaml")], run=False)
    assert mine.config.trainer.max_epochs == 3 and mine.config.model.init_args.attention == "softmax"
    assert mine.trainer.logger.name == "chosen" and mine.trainer.checkpoint_callback.dirpath.endswith("checkpoints/mine")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        main(["fit", "--config", str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        main(["fit", "--config", str(tmp_path / "c.yaml")])
