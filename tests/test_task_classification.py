"""ClassificationTask: losses, EMA (the LattnEMA callback), freezing, layer decay, distillation, predictions,
pretrained ViT fine-tuning, and the command line from `lattn fit` to `lattn predict` on the embedded synthetic set."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset

from lattn_app.backbones.timm_weights import read_state_dict
from lattn_app.callbacks import LattnCheckpoint, LattnEMA
from lattn_app.cli import main
from lattn_app.data.synthetic_classification import SYNTHETIC_CLASSES
from lattn_app.tasks import ClassificationPredictionWriter, ClassificationTask
from lattn_app.tasks.distillation import distillation_loss

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "classification_quickstart.yaml"
# Tasks used outside a Trainer log nothing; Lightning warns about each self.log() call then.
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self\.log\(\)`")

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0}


pytestmark = pytest.mark.usefixtures("one_thread")


class QuadrantImages(Dataset):
    """Learnable toy images: class c has a bright square in quadrant c (0..3) on a noisy background."""

    def __init__(self, n: int, size: int = 16, seed: int = 0, num_classes: int = 4) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=generator)
        self.images = torch.rand(n, 3, size, size, generator=generator) * 0.4
        half = size // 2
        for i, label in enumerate(self.labels.tolist()):
            row, col = divmod(label % 4, 2)
            self.images[i, :, row * half : (row + 1) * half, col * half : (col + 1) * half] += 0.6
        self.images = self.images.clamp(0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class PatternImages(QuadrantImages):
    """Learnable toy images whose class is a texture seen in every patch: horizontal stripes, vertical
    stripes, checkerboard or plain, with random colours, period, phase and noise."""

    def __init__(self, n: int, size: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=generator)
        rows = torch.arange(size).view(-1, 1).expand(size, size)
        cols = torch.arange(size).view(1, -1).expand(size, size)
        images = []
        for label in self.labels.tolist():
            period = int(torch.randint(4, 9, (), generator=generator))
            phase = int(torch.randint(0, period, (), generator=generator))
            bands = {0: (rows + phase) // (period // 2) % 2, 1: (cols + phase) // (period // 2) % 2,
                     2: ((rows + phase) // (period // 2) + (cols + phase) // (period // 2)) % 2,
                     3: torch.zeros(size, size, dtype=torch.long)}[label].float()
            low, high = torch.rand(2, 3, 1, 1, generator=generator)
            image = low + (high - low + 0.3 * torch.sign(high - low)) * bands
            images.append(image + 0.05 * torch.randn(3, size, size, generator=generator))
        self.images = torch.stack(images).clamp(0, 1)


def batch_of(n: int = 4, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    data = QuadrantImages(n, size, seed)
    return {"image": data.images, "label": data.labels}


def tiny_task(**options) -> ClassificationTask:
    options.setdefault("backbone", "vit")
    options.setdefault("backbone_options", dict(TINY_VIT))
    options.setdefault("num_classes", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ClassificationTask(**options)


def quiet_trainer(**options) -> Trainer:
    options.setdefault("max_epochs", 1)
    options.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, **options)


def loaders(n: int = 32, batch_size: int = 8, size: int = 16):
    train = DataLoader(QuadrantImages(n, size, seed=1), batch_size=batch_size, shuffle=True)
    val = DataLoader(QuadrantImages(16, size, seed=2), batch_size=batch_size)
    return train, val


# --- losses ---------------------------------------------------------------------------------------


def test_label_smoothed_cross_entropy_is_the_training_loss():
    task = tiny_task(label_smoothing=0.2).train()
    batch = batch_of()
    logits = task.backbone(task.normalize(batch["image"]))
    expected = F.cross_entropy(logits, batch["label"], label_smoothing=0.2)
    torch.testing.assert_close(task.training_loss(batch), expected)
    assert task.train_metrics is not None  # unmixed training reports its accuracy


def test_mixup_and_cutmix_train_on_soft_targets():
    task = tiny_task(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1).train()
    assert task.train_metrics is None  # mixed images have no single label: no training accuracy
    batch = batch_of(n=6)
    original = batch["image"].clone()
    np.random.seed(0)
    loss = task.training_loss(batch)  # timm mixes the batch in place
    np.random.seed(0)
    images, targets = task.mixup(original.clone(), batch["label"])
    assert targets.shape == (6, 4) and torch.allclose(targets.sum(dim=1), torch.ones(6))
    assert not torch.equal(images, original)
    expected = SoftTargetCrossEntropy()(task.backbone(task.normalize(images)), targets)
    torch.testing.assert_close(loss, expected)
    # An odd batch (a last incomplete one) cannot be paired up: it trains unmixed, label-smoothed.
    odd = batch_of(n=5)
    plain = F.cross_entropy(task.backbone(task.normalize(odd["image"])), odd["label"], label_smoothing=0.1)
    torch.testing.assert_close(task.training_loss(odd), plain)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="class_names has 2 names"):
        tiny_task(class_names=["a", "b"])
    with pytest.raises(ValueError, match="must not set num_classes"):
        tiny_task(backbone_options={**TINY_VIT, "num_classes": 3})
    with pytest.raises(ValueError, match="ema_decay.*LattnEMA"):  # the EMA is a callback now
        tiny_task(ema_decay=0.999)
    with pytest.raises(ValueError, match="decay"):
        LattnEMA(decay=1.5)
    with pytest.raises(ValueError, match="distillation_type"):
        tiny_task(distillation_type="medium")
    with pytest.raises(ValueError, match="mixup_mode"):
        tiny_task(mixup_alpha=0.8, mixup_mode="odd")
    with pytest.raises(ValueError, match="backbone_options.attention is not read: set model.attention: softmax"):
        tiny_task(backbone_options={**TINY_VIT, "attention": "softmax"})


def test_attention_is_the_backbone_s_attention_option():
    mechanisms = {attention: type(tiny_task(attention=attention).backbone.blocks[0].attn).__name__
                  for attention in (None, "efficient", "performer")}
    assert mechanisms == {None: "SoftmaxAttention", "efficient": "EfficientAttention",
                          "performer": "PerformerAttention"}  # None: the backbone's own default


# --- EMA, freezing, layer decay ------------------------------------------------------------------


class Weights(Callback):
    """Test only: the task's weights and the EMA callback's average when training (re)starts and at the
    end of the first epoch (after its validation)."""

    def snapshot(self, trainer, pl_module) -> dict[str, dict[str, torch.Tensor]]:
        ema = next(c for c in trainer.callbacks if isinstance(c, LattnEMA))
        return {"weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "average": {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}}

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = self.snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            self.at_epoch_end = self.snapshot(trainer, pl_module)


class Interrupted(Exception):
    pass


class InterruptAtStep(Callback):
    """Test only: the run stops with an exception before optimiser step `step + 1` (as if it were killed)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Interrupted


def fit_with_ema(task: ClassificationTask, folder: Path, max_steps: int, ckpt_path: Path | None = None,
                 *extra: Callback) -> Trainer:
    """`max_steps` steps (4 per epoch), validation after each epoch on one batch, last.ckpt in `folder`."""
    train, val = loaders()
    callbacks = [LattnEMA(decay=0.5), LattnCheckpoint(dirpath=str(folder), monitor=None, last_every_n_steps=None),
                 *extra]
    trainer = quiet_trainer(max_steps=max_steps, max_epochs=-1, limit_val_batches=1, callbacks=callbacks,
                            enable_checkpointing=True)
    trainer.fit(task, train, val, ckpt_path=ckpt_path)
    return trainer


def test_ema_weights_are_used_for_evaluation_and_saved_in_the_checkpoint(tmp_path):
    task = tiny_task(lr=1e-2)
    probe = Weights()
    trainer = fit_with_ema(task, tmp_path / "run", 4, None, probe)
    path = tmp_path / "run" / "last.ckpt"  # written at the end of the epoch, after its validation
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    averaged, online = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert averaged.keys() == online.keys() == task.state_dict().keys()
    assert not any(key.startswith("ema.") for key in averaged)
    assert any(not torch.equal(online[name], averaged[name]) for name in online)
    # Training runs the online weights (the average is only swapped in for validation).
    for name in online:
        assert torch.equal(probe.at_epoch_end["weights"][name], online[name]), name
        assert torch.equal(probe.at_epoch_end["average"][name], averaged[name]), name

    def with_weights(state) -> ClassificationTask:
        model = tiny_task()
        model.load_state_dict(state)
        return model.eval()

    # Validation ran on the averaged weights, not the online ones.
    batch = next(iter(loaders()[1]))
    with torch.no_grad():
        ema_loss = F.cross_entropy(with_weights(averaged)(batch["image"]), batch["label"])
        online_loss = F.cross_entropy(with_weights(online)(batch["image"]), batch["label"])
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], ema_loss)
    assert not torch.allclose(ema_loss, online_loss)
    # After fit the task evaluates with the averaged weights; so does a task loaded from the checkpoint.
    images = batch_of(seed=3)["image"]
    task.eval()
    restored = ClassificationTask.load_from_checkpoint(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(task(images), with_weights(averaged)(images))
        torch.testing.assert_close(restored(images), with_weights(averaged)(images))
        assert not torch.allclose(task(images), with_weights(online)(images))
    # Pretrained loading (and a distillation teacher) reads a checkpoint's averaged weights.
    name = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(read_state_dict(str(path))[name], averaged[f"backbone.{name}"])


def test_a_resumed_run_with_ema_ends_as_an_uninterrupted_one(tmp_path):
    torch.manual_seed(0)
    reference = tiny_task(lr=1e-2)
    fit_with_ema(reference, tmp_path / "reference", max_steps=8)
    torch.manual_seed(0)
    with pytest.raises(Interrupted):  # after the checkpoint of the end of epoch 0
        fit_with_ema(tiny_task(lr=1e-2), tmp_path / "run", 8, None, InterruptAtStep(5))
    stopped = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=False)
    assert stopped["global_step"] == 4

    probe = Weights()
    fit_with_ema(tiny_task(lr=1e-2), tmp_path / "resumed", 8, tmp_path / "run" / "last.ckpt", probe)
    # Training continues from the online weights; the average continues from the saved average.
    for name, value in stopped["current_model_state"].items():
        assert torch.equal(probe.at_start["weights"][name], value), name
    for name, value in stopped["state_dict"].items():
        assert torch.equal(probe.at_start["average"][name], value), name
    resumed = torch.load(tmp_path / "resumed" / "last.ckpt", map_location="cpu", weights_only=False)
    expected = torch.load(tmp_path / "reference" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == expected["global_step"] == 8
    for key in ("state_dict", "current_model_state"):
        for name, value in expected[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")


def test_freeze_backbone_trains_only_the_head():
    task = tiny_task(freeze_backbone=True, lr=1e-2)
    before = {name: p.detach().clone() for name, p in task.backbone.named_parameters()}
    train, _ = loaders()
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(task, train)
    for name, parameter in task.backbone.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == name.startswith("head."), name


def test_layer_decay_gives_earlier_blocks_smaller_learning_rates():
    task = tiny_task(layer_decay=0.5, lr=1.0)
    lr_of = {}
    for group in task.parameter_groups():
        for parameter in group["params"]:
            lr_of[id(parameter)] = group["lr"]
    backbone = dict(task.backbone.named_parameters())
    lrs = [lr_of[id(backbone[f"blocks.{i}.attn.qkv.weight"])] for i in range(3)]
    patch = lr_of[id(backbone["patch_embed.proj.weight"])]
    head = lr_of[id(backbone["head.weight"])]
    assert patch < lrs[0] < lrs[1] < lrs[2] < head == 1.0
    assert lrs[0] / lrs[1] == pytest.approx(0.5)


# --- distillation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A trained-for-two-steps tiny ViT ClassificationTask saved as a Lightning checkpoint."""
    teacher = tiny_task(lr=1e-2)
    train, _ = loaders()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(teacher, train)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_distillation_with_care_applies_to_the_distillation_head(teacher_checkpoint, kind):
    student = ClassificationTask(backbone="care_s0", num_classes=4, teacher_checkpoint=str(teacher_checkpoint),
                                 distillation_type=kind, distillation_alpha=0.3, distillation_tau=2.0,
                                 label_smoothing=0.0).train()
    batch = batch_of(n=2, size=32)
    torch.manual_seed(5)
    loss = student.training_loss(batch)

    outputs = student.backbone(student.normalize(batch["image"]))
    assert isinstance(outputs, tuple)  # CARE in training mode: (class logits, distillation logits)
    teacher = student.teacher()
    with torch.no_grad():
        teacher_logits = teacher(batch["image"])
    expected = 0.7 * F.cross_entropy(outputs[0], batch["label"]) + 0.3 * distillation_loss(
        outputs[1], teacher_logits, kind, 2.0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.backbone.dist_head.fc.weight.grad.abs().sum() > 0
    # The teacher is frozen, in eval mode, and not part of the student's weights.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any("teacher" in key for key in student.state_dict())


def test_distillation_from_a_timm_weights_file(tmp_path):
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    torch.save(model.state_dict(), tmp_path / "resnet10t.pth")
    student = tiny_task(teacher_checkpoint=str(tmp_path / "resnet10t.pth"), teacher_backbone="resnet10t").train()
    batch = batch_of()
    loss = student.training_loss(batch)
    model.eval()
    with torch.no_grad():
        teacher_logits = model(student.normalize(batch["image"]))  # timm's ImageNet normalisation
    logits = student.backbone(student.normalize(batch["image"]))
    expected = 0.5 * F.cross_entropy(logits, batch["label"], label_smoothing=0.1) + 0.5 * F.cross_entropy(
        logits, teacher_logits.argmax(dim=1))
    torch.testing.assert_close(loss, expected)


def test_a_distillation_head_without_teacher_learns_the_labels():
    task = ClassificationTask(backbone="care_s0", num_classes=4, label_smoothing=0.0).train()
    batch = batch_of(n=2, size=32)
    loss = task.training_loss(batch)
    cls, dist = task.backbone(task.normalize(batch["image"]))
    expected = (F.cross_entropy(cls, batch["label"]) + F.cross_entropy(dist, batch["label"])) / 2
    torch.testing.assert_close(loss, expected)


# --- predictions ----------------------------------------------------------------------------------


def test_predict_returns_class_names_and_the_writer_writes_them(tmp_path, capsys):
    names = ["north_west", "north_east", "south_west", "south_east"]
    task = tiny_task(class_names=names).eval()
    batch = {"image": batch_of(n=3)["image"], "path": ["a.png", "b.png", "c.png"]}
    with torch.no_grad():
        predictions = task.predict_step(batch, 0)
    assert [p["path"] for p in predictions] == ["a.png", "b.png", "c.png"]
    for prediction in predictions:
        assert prediction["class_name"] == names[prediction["class_index"]]
        probabilities = [entry["probability"] for entry in prediction["top5"]]
        assert len(probabilities) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert prediction["probability"] == probabilities[0] and sum(probabilities) == pytest.approx(1, abs=1e-5)

    writer = ClassificationPredictionWriter(output_dir=str(tmp_path / "out"))
    trainer = quiet_trainer(callbacks=[writer])
    images = DataLoader([{"image": image, "path": f"img{i}.png"} for i, image in enumerate(batch["image"])], batch_size=2)
    trainer.predict(task, images)
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [row["path"] for row in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(row["class"] in names and row["top5"].count(":") == 4 for row in rows)
    assert str((tmp_path / "out" / "predictions.csv").resolve()) in capsys.readouterr().out


# --- pretrained ViT-S fine-tuned with efficient attention ------------------------------------------


def train_timm_vit_small(path: Path, steps: int = 40, size: int = 32) -> None:
    """timm's vit_small_patch16_224 (softmax attention, 224 shapes) trained briefly on texture images at
    `size` pixels (dynamic image size), its state dict saved to `path`."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=4, dynamic_img_size=True)
    data = DataLoader(PatternImages(512, size, seed=10), batch_size=32, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    model.train()
    step = 0
    while step < steps:
        for batch in data:
            loss = F.cross_entropy(model((batch["image"] - mean) / std), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            warmup.step()
            step += 1
            if step == steps:
                break
    torch.save(model.state_dict(), path)


def test_timm_vit_small_weights_fine_tune_as_efficient_attention_from_a_lower_loss(tmp_path):
    weights = tmp_path / "vit_small_patch16_224.pth"
    train_timm_vit_small(weights)
    state = torch.load(weights, weights_only=True)
    assert state["pos_embed"].shape == (1, 197, 384)  # the real 224 x 224 shapes

    pretrained = ClassificationTask(backbone="vit_small", attention="efficient", num_classes=4,
                                    backbone_options={"pretrained": str(weights)})
    report = pretrained.backbone.load_report
    assert not [key for key in report.missing if "qkv" in key or "proj" in key], report.missing
    assert not report.unexpected and not report.reinitialised_head
    assert "blocks.11.attn.qkv.weight" in report.loaded and "blocks.11.attn.proj.weight" in report.loaded
    scratch = ClassificationTask(backbone="vit_small", attention="efficient", num_classes=4)

    val = PatternImages(128, 32, seed=11)
    losses = {}
    for name, task in (("pretrained", pretrained), ("scratch", scratch)):
        task.eval()
        with torch.no_grad():
            losses[name] = F.cross_entropy(task(val.images), val.labels).item()
    assert losses["scratch"] == pytest.approx(math.log(4), abs=0.15)
    assert losses["pretrained"] < losses["scratch"] - 0.3, losses


# --- the command line, as a new user runs it -------------------------------------------------------


def test_fit_then_test_best_checkpoint_then_predict_on_the_embedded_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.enable_progress_bar", "false", "--data.num_workers", "0", "--data.batch_size", "16",
             "--trainer.log_every_n_steps", "1"]
    main(["fit", "--config", str(QUICKSTART), *quick, "--trainer.max_epochs", "2",
          "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2"])
    best = tmp_path / "checkpoints" / "classification_quickstart" / "best.ckpt"
    assert best.is_file() and (best.parent / "last.ckpt").is_file()
    assert f"Best checkpoint: {best}" in capsys.readouterr().out
    assert list((tmp_path / "lightning_logs" / "classification_quickstart").glob("version_*/events.out.tfevents.*"))

    main(["test", "--config", str(QUICKSTART), *quick, "--ckpt_path", str(best), "--trainer.limit_test_batches", "2"])
    assert "test_acc" in capsys.readouterr().out

    synthetic = next((tmp_path / "cache").glob("synthetic_classification_*"))
    main(["predict", "--config", str(QUICKSTART), *quick, "--ckpt_path", str(best),
          "--data.predict_dir", str(synthetic / "test" / "star")])
    csv_path = tmp_path / "predictions" / "classification_quickstart" / "predictions.csv"
    assert str(csv_path) in capsys.readouterr().out
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == len(list((synthetic / "test" / "star").glob("*.png")))
    assert all(row["class"] in SYNTHETIC_CLASSES and row["path"].endswith(".png") for row in rows)
    assert all(row["top5"].split(";")[0].split(":")[0] == row["class"] for row in rows)


@pytest.mark.slow
def test_quickstart_config_learns_the_embedded_set_well_above_chance(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(QUICKSTART), "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    accuracy = float(out.split("Validation accuracy ")[1].split()[0])
    assert accuracy > 0.6, out


class LearningRates(Callback):
    """The first parameter group's learning rate at every training step."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_sgd_with_warm_up_and_tenfold_drops_at_the_milestones(tmp_path):
    """optimizer: sgd and lr_milestones (the ResNet and Mask R-CNN recipes), under a real Trainer."""
    task = ClassificationTask(backbone="pyramid_tiny", backbone_options={"img_size": 32}, num_classes=4,
                              optimizer="sgd", momentum=0.8, lr=0.1, weight_decay=1e-4, warmup_epochs=0.5,
                              lr_milestones=[2, 3])
    rates = LearningRates()
    trainer = Trainer(max_epochs=4, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[rates], default_root_dir=tmp_path)
    trainer.fit(task, DataLoader(QuadrantImages(4, size=32), batch_size=2))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.8
    # 2 steps per epoch: warm-up over step 0 (0.5 epochs), drops after 2 and 3 epochs (steps 4 and 6).
    assert rates.rates == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize("options, message", [({"optimizer": "adam"}, "optimizer"),
                                              ({"lr_milestones": [0, 8]}, "lr_milestones must be positive")])
def test_bad_optimiser_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        ClassificationTask(backbone="pyramid_tiny", num_classes=4, **options)
