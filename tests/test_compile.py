"""`compile: true` on every task: the task's network is compiled in place with torch.compile.

The default tests check the wiring, that no mechanism and no quickstart network breaks the graph
(dynamo's trace, nothing compiled), and that a compiled task trains and predicts exactly like the eager
one with every mechanism through dynamo and AOT autograd (``compile_options: {backend: aot_eager}``: the
whole tracing path, without inductor's code generation, which takes tens of seconds per network on the
CPU). The slow ones do the same with inductor.
"""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lattn_app.attention import attention_info, create_attention, list_attentions
from lattn_app.bench.compiled import NETWORKS, graph_breaks, network_inputs
from lattn_app.bench.export_latency import quickstart_task
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


def mechanism(name: str, hw: tuple[int, int], dim: int = 32) -> torch.nn.Module:
    options = {"grid_size": hw} if attention_info(name).fixed_grid else {}
    if name == "mixer":
        options["num_prefix_tokens"] = 0
    torch.manual_seed(0)
    return create_attention(name, dim=dim, num_heads=2, **options)


@pytest.mark.parametrize("name", list_attentions())
def test_no_mechanism_breaks_the_graph(name):
    hw = (8, 8)
    module = mechanism(name, hw)
    x = torch.randn(2, hw[0] * hw[1], 32, requires_grad=True)
    for training in (False, True):
        module.train(training)
        with torch.set_grad_enabled(training):
            breaks, reasons = graph_breaks(lambda x: module(x, hw=hw), x)
        assert breaks == 0, f"{name} ({'training' if training else 'inference'}): {reasons}"


@pytest.mark.parametrize("task_name", list(NETWORKS))
def test_no_quickstart_network_breaks_the_graph(task_name):
    config, from_data, _, _ = NETWORKS[task_name]
    task = quickstart_task(config, from_data)
    network = operator.attrgetter(task.compiled_part)(task)
    inputs = network_inputs(task_name, task, (32, 64), 1, torch.device("cpu"))
    with torch.no_grad():
        breaks, reasons = graph_breaks(network, *inputs)
    assert breaks == 0, reasons


class TinyImages(torch.utils.data.Dataset):
    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.images = torch.rand(count, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index]), "path": f"image{index}.png"}


def trained_and_predicted(name: str, compile_options: dict | None):
    torch.manual_seed(0)
    options = {"redraw_interval": 2} if name == "performer" else {}  # redraws during the 3 steps
    task = ClassificationTask(backbone="vit", attention=name, attention_options=options, num_classes=3,
                              backbone_options={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                "num_heads": 2}, label_smoothing=0.0,
                              # SGD, not AdamW: Adam scales a gradient of 1e-9 (efficient attention's key bias has
                              # none, mathematically) to a full step, so rounding noise would decide the weights.
                              optimizer="sgd", lr=0.05,
                              compile=compile_options is not None, compile_options=compile_options)
    trainer = Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, train_dataloaders=DataLoader(TinyImages(12), batch_size=4))
    predictions = trainer.predict(task, dataloaders=DataLoader(TinyImages(4), batch_size=4))
    return task, [item["probability"] for batch in predictions for item in batch]


@pytest.mark.parametrize("name", list_attentions())
def test_a_compiled_task_trains_and_predicts_like_the_eager_one_with_every_mechanism(name):
    eager, eager_predictions = trained_and_predicted(name, None)
    compiled, compiled_predictions = trained_and_predicted(name, {"backend": "aot_eager", "fullgraph": True})
    assert operator.attrgetter(compiled.compiled_part)(compiled)._compiled_call_impl is not None
    for key, value in eager.state_dict().items():  # the same three steps, weights and buffers alike
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert compiled_predictions == pytest.approx(eager_predictions, rel=1e-4)
    if name == "performer":  # the redraw count, which the compiled graph leaves to the task: 3 passes, 1 redraw
        counters = [(int(m.redraws), int(m.calls_since_redraw)) for m in compiled.modules() if hasattr(m, "redraws")]
        assert counters and all(counter == (1, 1) for counter in counters)


@pytest.mark.slow  # inductor: tens of seconds per mechanism on a 2-core CPU
@pytest.mark.parametrize("name", list_attentions())
def test_an_inductor_compiled_task_trains_and_predicts_like_the_eager_one(name):
    eager, eager_predictions = trained_and_predicted(name, None)
    compiled, compiled_predictions = trained_and_predicted(name, {})
    for key, value in eager.state_dict().items():  # inductor's kernels round differently: a looser tolerance
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert compiled_predictions == pytest.approx(eager_predictions, rel=1e-3)
