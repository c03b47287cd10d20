"""`lattn export`: exported ONNX files (run with onnxruntime) and torch.export programs reproduce the eager model.

Each check runs the written file itself, outside lattn's exporter, at the size it was traced at and at
a size it never saw, and compares with the task's own eager forward pass (relative error <= 1e-4 in fp32).
Checkpoints are saved by Lightning's Trainer from models built from the shipped configs (untrained:
what is checked is the computation, not the accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from lattn_app import tasks
from lattn_app.cli import main, user_error_message
from lattn_app.export import METADATA_FILE, export_model
from tests.helpers import ALL_MECHANISMS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PARITY = 1e-4
# What each quickstart config's datamodule links to its model at training (their embedded sets).
FROM_DATA = {
    "ClassificationTask": {"num_classes": 10, "class_names": [f"class{i}" for i in range(10)]},
    "StereoTask": {"max_disparity": 48},
    "SegmentationTask": {"num_classes": 9, "category_ids": list(range(1, 10)),
                         "class_names": ["sky", "grass", "road", "water", "wall", "tree", "brick", "cloth", "pole"]},
    "DetectionTask": {"num_classes": 4, "category_ids": [1, 3, 7, 9], "class_names": ["circle", "square", "triangle", "star"]},
}


def save_checkpoint(task: tasks.LattnTask, path: Path) -> Path:
    """A checkpoint as lattn writes them (Lightning's Trainer, the task's own lattn record), without training."""
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    return path


def quickstart_task(config: str) -> tasks.LattnTask:
    """The model of a shipped config, built as `lattn fit` builds it (with what its data links)."""
    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    task_class = getattr(tasks, model["class_path"])
    torch.manual_seed(0)
    task = task_class(**model["init_args"], **FROM_DATA[model["class_path"]])
    return task.eval()


def relative_error(actual, expected: torch.Tensor) -> float:
    actual = torch.as_tensor(np.asarray(actual))
    assert tuple(actual.shape) == tuple(expected.shape)
    return float((actual.to(expected.dtype) - expected).abs().max() / expected.abs().max())


def runner(path: Path, fmt: str):
    """A function running the written file on inputs, returning its outputs as a list (onnxruntime or torch)."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *inputs: session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})
    module = torch.export.load(path).module()

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        outputs = module(*inputs)
        return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]

    return run


def run_export(tmp_path: Path, config: str, task: tasks.LattnTask, fmt: str, size: tuple[int, int],
               *options: str) -> Path:
    checkpoint = save_checkpoint(task, tmp_path / "model.ckpt")
    output = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    main(["export", "--config", str(CONFIGS / config), "--ckpt_path", str(checkpoint), "--format", fmt,
          "--output", str(output), "--image_size", f"[{size[0]}, {size[1]}]", *options])
    assert output.is_file()
    return output


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def metadata_of(path: Path, fmt: str) -> dict:
    if fmt == "onnx":
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props["lattn"])
    extra = {METADATA_FILE: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[METADATA_FILE])


# --- the quickstart networks ------------------------------------------------------------------------
# Each export takes 10-25 s on the 2-core machine; the default run exports ONNX here and a torch.export
# program of a small network below (the other combinations are slow tests).
@pytest.mark.parametrize("fmt", ["onnx", pytest.param("torch_export", marks=pytest.mark.slow)])
def test_classification_quickstart_exports_with_its_preprocessing_and_any_size(tmp_path, fmt):
    task = quickstart_task("classification_quickstart.yaml")
    path = run_export(tmp_path, "classification_quickstart.yaml", task, fmt, (32, 32))
    run = runner(path, fmt)
    with torch.no_grad():
        for x in (images(2, 32, 32), images(3, 48, 40)):  # the traced size, and one never seen
            assert relative_error(run(x)[0], task(x)) <= PARITY
    metadata = metadata_of(path, fmt)
    assert metadata["task"] == "ClassificationTask" and metadata["class_names"] == FROM_DATA["ClassificationTask"]["class_names"]
    assert metadata["mean"] == pytest.approx([0.485, 0.456, 0.406]) and metadata["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert metadata["inputs"]["images"]["range"] == [0.0, 1.0] and metadata["inputs"]["images"]["layout"] == "NCHW"
    assert metadata["dynamic_axes"] == ["batch", "height", "width"] and metadata["size_multiple"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_stereo_quickstart_exports_disparity_from_a_pair(tmp_path, fmt):
    task = quickstart_task("sceneflow_efficient.yaml")
    path = run_export(tmp_path, "sceneflow_efficient.yaml", task, fmt, (64, 128))
    run = runner(path, fmt)
    with torch.no_grad():
        for batch, height, width in ((2, 64, 128), (1, 96, 160)):  # batch and size both vary
            left, right = images(batch, height, width, 1), images(batch, height, width, 2)
            assert relative_error(run(left, right)[0], task(left, right)) <= PARITY
    metadata = metadata_of(path, fmt)
    assert metadata["max_disparity"] == 48 and metadata["dynamic_axes"] == ["batch", "height", "width"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_segmentation_quickstart_exports_labels_and_logits(tmp_path, fmt):
    task = quickstart_task("segmentation_quickstart.yaml")
    path = run_export(tmp_path, "segmentation_quickstart.yaml", task, fmt, (64, 96))
    run = runner(path, fmt)
    with torch.no_grad():
        for x in (images(2, 64, 96), images(1, 96, 64)):
            labels, logits = run(x)
            expected = task(x)
            assert relative_error(logits, expected) <= PARITY
            # argmax of (nearly) equal logits: the labels agree wherever the eager top two are not tied
            margin = expected.topk(2, dim=1).values.diff(dim=1).abs().squeeze(1) > 1e-4
            assert torch.equal(torch.as_tensor(np.asarray(labels))[margin], expected.argmax(dim=1)[margin])
    metadata = metadata_of(path, fmt)
    assert metadata["category_ids"] == list(range(1, 10)) and metadata["class_names"][0] == "sky"


# Slow (110 s for ONNX, mostly the exporter's graph passes); the default suite checks the exported computation
# eagerly against torchvision's (test_export_detector.py).
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_detection_quickstart_exports_whole_and_gives_torchvisions_detections(tmp_path, fmt):
    task = quickstart_task("coco_quickstart.yaml")
    path = run_export(tmp_path, "coco_quickstart.yaml", task, fmt, (128, 160))
    run = runner(path, fmt)
    names = ("boxes", "labels", "scores", "masks")
    with torch.no_grad():
        for height, width in ((128, 160), (150, 97)):  # the traced size and one it never saw, not a multiple of 32
            image = images(1, height, width)[0]
            expected = task([image])[0]  # torchvision's own inference
            actual = dict(zip(names, run(image)))
            assert len(expected["boxes"]) > 0 and actual["masks"].shape == (len(expected["boxes"]), 1, height, width)
            assert np.array_equal(np.asarray(actual["labels"]), expected["labels"].numpy())
            for name in ("boxes", "scores", "masks"):
                assert relative_error(actual[name], expected[name]) <= PARITY, name
    metadata = metadata_of(path, fmt)
    assert list(metadata["outputs"]) == list(names) and metadata["class_names"][0] == "circle"
    assert metadata["dynamic_axes"] == ["height", "width"] and metadata["min_size"] == 65


@pytest.mark.slow  # 45 s each; the default suite checks the same computation eagerly (test_export_detector.py)
@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_a_one_stage_detector_exports_whole(detector):
    torch.manual_seed(0)
    task = tasks.DetectionTask(detector=detector, backbone="pyramid_tiny", num_classes=3,
                               backbone_options={"embed_dims": [16, 32, 32, 48], "depths": [1, 1, 1, 1],
                                                 "num_heads": [1, 1, 2, 2]}, net={"neck_channels": 32})
    spread_one_stage_scores(task.detector)
    content, metadata, errors = export_model(task, "onnx", (144, 176))  # checked against torchvision at two sizes
    assert len(errors) == 4 and max(errors.values()) <= PARITY  # onnx and torch_export, two sizes each
    assert list(metadata["outputs"]) == ["boxes", "labels", "scores"] and metadata["detections_per_image"] == 100
    assert metadata["min_size"] == 129  # more than the stride of P7, the coarsest level
    session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    image = images(1, 150, 131)[0]
    with torch.no_grad():
        expected = task([image])[0]
    boxes, labels, scores = session.run(None, {"image": image.numpy()})
    assert len(expected["boxes"]) == 100 and np.array_equal(labels, expected["labels"].numpy())
    assert relative_error(boxes, expected["boxes"]) <= PARITY and relative_error(scores, expected["scores"]) <= PARITY


def spread_one_stage_scores(model: torch.nn.Module) -> None:
    """Heads more like a trained one's than an untrained one's: scores apart and boxes not the anchors themselves
    (an untrained RetinaNet scores everything about 0.01, its boxes are its anchors, and equal scores or IoUs
    exactly at the threshold may go either way)."""
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.normal_(0, 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_detection_quickstart_exports_its_feature_pyramid(tmp_path, fmt):
    task = quickstart_task("coco_quickstart.yaml")
    path = run_export(tmp_path, "coco_quickstart.yaml", task, fmt, (128, 160), "--part", "features")
    run = runner(path, fmt)
    with torch.no_grad():
        for x in (images(2, 128, 160), images(1, 160, 96)):
            expected = list(task.detector.backbone(task.normalize(x)).values())
            actual = run(x)
            assert len(actual) == len(expected) == 5  # p2 .. p6
            for level, reference in zip(actual, expected):
                assert relative_error(level, reference) <= PARITY
    metadata = metadata_of(path, fmt)
    assert metadata["part"] == "features" and metadata["class_names"][0] == "circle"
    assert list(metadata["outputs"]) == ["p2", "p3", "p4", "p5", "p6"]


# --- every attention mechanism ------------------------------------------------------------------------
def tiny_classifier(attention: str, **attention_options) -> tasks.ClassificationTask:
    torch.manual_seed(0)
    return tasks.ClassificationTask(
        backbone="vit", attention=attention, attention_options=attention_options or None, num_classes=5,
        backbone_options={"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                          "class_token": True, "global_pool": "token"}).eval()


def check_written(tmp_path: Path, task: tasks.LattnTask, fmt: str, size: tuple[int, int],
                  others: list[tuple[int, int]]) -> dict:
    content, metadata, _ = export_model(task, fmt, size)
    path = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt2")
    path.write_bytes(content)
    run = runner(path, fmt)
    with torch.no_grad():
        for index, (height, width) in enumerate([size, *others]):
            x = images(2 if index == 0 else 1, height, width)
            assert relative_error(run(x)[0], task(x)) <= PARITY, (height, width)
    return metadata


@pytest.mark.parametrize(("attention", "fmt"), [
    pytest.param(attention, fmt, marks=[] if (attention, fmt) == ("efficient", "torch_export") else pytest.mark.slow)
    for attention in ALL_MECHANISMS for fmt in ("onnx", "torch_export")])
def test_every_mechanism_exports_and_matches_eager_at_an_unseen_size(tmp_path, attention, fmt):
    # Fixed-grid mechanisms (linformer, mixer) are built for 8 x 8 tokens: traced at 8 x 10, checked at their
    # own grid and at 6 x 12 (their weights resampled, as in eager mode).
    metadata = check_written(tmp_path, tiny_classifier(attention), fmt, (32, 40), [(32, 32), (24, 48)])
    assert metadata["dynamic_axes"] == ["batch", "height", "width"]


@pytest.mark.slow
def test_a_fixed_grid_mechanism_that_refuses_other_grids_is_exported_at_its_grid(tmp_path):
    task = tiny_classifier("linformer", on_other_grid="error")
    metadata = check_written(tmp_path, task, "onnx", (32, 32), [])
    assert metadata["dynamic_axes"] == ["batch"] and metadata["fixed_size"] == [32, 32]
    assert "on_other_grid='error'" in metadata["fixed_size_reasons"][0]


# --- refusals -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classification_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(quickstart_task("classification_quickstart.yaml"),
                           tmp_path_factory.mktemp("export") / "best.ckpt")


def export_error(capsys, *words: str) -> str:
    """The one line `lattn` prints for `lattn export words...` (raised in-process, shown as the console does)."""
    with pytest.raises((ValueError, OSError)) as raised:
        main(["export", "--config", str(CONFIGS / "classification_quickstart.yaml"), *words])
    message = user_error_message(raised.value)
    assert message is not None, "not reported as the user's error"
    return message


def test_an_existing_output_is_not_replaced_without_overwrite(tmp_path, classification_checkpoint, capsys):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"earlier export")
    message = export_error(capsys, "--ckpt_path", str(classification_checkpoint), "--format", "onnx",
                           "--output", str(output))
    assert "--output" in message and "--overwrite true" in message
    assert output.read_bytes() == b"earlier export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_bad_options_are_named_and_nothing_is_written(tmp_path, classification_checkpoint, capsys):
    ckpt = ["--ckpt_path", str(classification_checkpoint)]
    assert "--format: expected one of onnx, torch_export; got 'tflite'" in export_error(
        capsys, *ckpt, "--format", "tflite", "--output", str(tmp_path / "m.onnx"))
    assert "--output: a --format onnx file ends in .onnx" in export_error(
        capsys, *ckpt, "--format", "onnx", "--output", str(tmp_path / "m.pt2"))
    missing = export_error(capsys, "--ckpt_path", str(tmp_path / "none.ckpt"), "--format", "onnx",
                           "--output", str(tmp_path / "m.onnx"))
    assert "--ckpt_path" in missing and "none.ckpt is not a file" in missing
    assert "--ckpt_path: expected" in export_error(capsys, "--format", "onnx", "--output", str(tmp_path / "m.onnx"))
    assert "--image_size" in export_error(capsys, *ckpt, "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
                                          "--image_size", "[30, 32]")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    other = save_checkpoint(tiny_classifier("softmax"), tmp_path / "other.ckpt")
    message = export_error(capsys, "--ckpt_path", str(other), "--format", "onnx", "--output", str(tmp_path / "m.onnx"))
    assert "trained as ClassificationTask with backbone vit/softmax" in message
    assert not (tmp_path / "m.onnx").exists()
