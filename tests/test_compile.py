"""`compile: true` on every task: the task's network is compiled in place with torch.compile.

The default tests check the wiring without compiling (torch.compile is lazy: nothing is compiled until
the network first runs); the slow one trains and evaluates a compiled classifier for real (inductor's
C++ backend on the CPU takes tens of seconds to compile) and compares it with the eager run.
"""

from __future__ import annotations

import operator
from pathlib import Path

import pytest

from lattn_app.cli import main
from lattn_app.tasks import ClassificationTask, DetectionTask, SegmentationTask, StereoTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_TASKS = {
    "classification": lambda **kw: ClassificationTask(backbone="pyramid_tiny", num_classes=3,
                                                      backbone_options={"img_size": 32}, **kw),
    "stereo": lambda **kw: StereoTask(max_disparity=32, **kw),
    "segmentation": lambda **kw: SegmentationTask(backbone="pyramid_tiny", num_classes=3, **kw),
    "detection": lambda **kw: DetectionTask(backbone="pyramid_tiny", num_classes=3, **kw),
}


@pytest.mark.parametrize("name", list(SMALL_TASKS))
def test_compile_compiles_the_task_s_network_in_place(name):
    eager = SMALL_TASKS[name]()
    task = SMALL_TASKS[name](compile=True)
    eager.setup("fit")
    task.setup("fit")
    network = operator.attrgetter(task.compiled_part)(task)
    assert network._compiled_call_impl is not None
    assert operator.attrgetter(eager.compiled_part)(eager)._compiled_call_impl is None
    assert list(task.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    task.setup("validate")  # compiled once, not wrapped again
    assert operator.attrgetter(task.compiled_part)(task) is network


def validation_accuracy(out: str) -> float:
    line = next(line for line in out.splitlines() if line.startswith("Validation accuracy"))
    return float(line.split()[2].rstrip(","))


@pytest.mark.slow  # about a minute: inductor compiles the forward and backward graphs on the CPU
def test_a_compiled_classifier_trains_and_evaluates_like_the_eager_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--config", str(CONFIGS / "classification_quickstart.yaml"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
              "--trainer.limit_val_batches", "2", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"]
    accuracies = {}
    for mode in ("eager", "compiled"):
        (tmp_path / mode).mkdir()
        monkeypatch.chdir(tmp_path / mode)
        main(["fit", *common, "--model.compile", str(mode == "compiled").lower()])
        accuracies[mode] = validation_accuracy(capsys.readouterr().out)
    # Same seed, same data, same three steps: only the kernels' rounding differs.
    assert accuracies["compiled"] == pytest.approx(accuracies["eager"], abs=0.05)
