"""PSMNet's own network and EA-PSMNet: the published size, the attention module's formula, the task and configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lattn_app.cli import main
from lattn_app.data.io import read_pfm
from lattn_app.data.synthetic_stereo import ensure_synthetic_sceneflow
from lattn_app.backbones.attention_module import AttentionModule2d
from lattn_app.models.psmnet import PSMNET_PARAMETERS, PSMNet
from lattn_app.registry import UnknownNameError
from lattn_app.tasks.stereo import StereoTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The smallest set the network takes whole: 32 x 64 images (a multiple of 16), disparities below 12.
TINY_SET = {"height": 32, "width": 64, "train_sequences": 2, "test_sequences": 1, "frames_per_sequence": 2,
            "min_disparity": 1.0, "max_disparity": 12.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def authors_parameter_count() -> int:
    """PSMNet's parameters added up layer by layer from the authors' stackhourglass and submodule code."""
    def conv(cin, cout, k=3, bn=True, dims=2):
        return cin * cout * k ** dims + (2 * cout if bn else 0)

    def block(cin, c):  # two 3x3 conv-BN, plus a 1x1 conv-BN shortcut where the shape changes
        return conv(cin, c) + conv(c, c) + (conv(cin, c, 1) if cin != c else 0)

    features = conv(3, 32) + 2 * conv(32, 32)  # firstconv
    features += 3 * block(32, 32) + block(32, 64) + 15 * block(64, 64)  # layer1, layer2
    features += block(64, 128) + 2 * block(128, 128) + 3 * block(128, 128)  # layer3, layer4 (dilated)
    features += 4 * conv(128, 32, 1) + conv(320, 128) + conv(128, 32, 1, bn=False)  # SPP branches, lastconv

    def conv3d(cin, cout, bn=True):
        return conv(cin, cout, 3, bn, dims=3)

    hourglass = conv3d(32, 64) + 3 * conv3d(64, 64) + conv3d(64, 64) + conv3d(64, 32)  # conv1-4, deconv5, deconv6
    aggregation = conv3d(64, 32) + 3 * conv3d(32, 32) + 3 * hourglass  # dres0, dres1, three hourglasses
    aggregation += 3 * (conv3d(32, 32) + conv3d(32, 1, bn=False))  # classifiers
    return features + aggregation


def test_psmnet_has_the_published_parameter_count():
    model = PSMNet(192)
    assert count(model) == authors_parameter_count() == PSMNET_PARAMETERS == 5_224_768
    assert round(count(model) / 1e6, 2) == 5.22  # the PSMNet paper's 5.22M
    assert count(PSMNet(48)) == PSMNET_PARAMETERS  # the disparity range changes no weight


@pytest.mark.parametrize("mechanism", ["efficient", "softmax"])
def test_ea_psmnet_is_psmnet_plus_the_attention_module(mechanism):
    model = PSMNet(192, attention=mechanism)
    module = model.feature_extraction.attention
    assert isinstance(module, AttentionModule2d) and module.channels == 128 and module.attention_name == mechanism
    # queries and keys: 1x1 convolutions 128 -> 64; values and the reprojection 128 -> 128; all with bias
    assert count(module) == 2 * (128 * 64 + 64) + 2 * (128 * 128 + 128) == 49_536
    assert count(model) == PSMNET_PARAMETERS + count(module)
    assert PSMNet(192).feature_extraction.attention is None


def test_initialisation_is_the_authors():
    model = PSMNet(32, attention="efficient")
    conv = model.feature_extraction.layer2[5].conv1[0]  # 3x3, 64 -> 64: std sqrt(2 / (9 * 64))
    assert abs(conv.weight.std().item() - (2 / (9 * 64)) ** 0.5) < 0.004
    conv3d = model.dres0[0][0]  # 3x3x3, 64 -> 32: std sqrt(2 / (27 * 32))
    assert abs(conv3d.weight.std().item() - (2 / (27 * 32)) ** 0.5) < 0.003
    norm = model.hourglasses[1].conv2[1]
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    # the attention module keeps its own: a zero reprojection, so EA-PSMNet starts as PSMNet
    assert torch.all(model.feature_extraction.attention.reprojection.weight == 0)


def test_three_outputs_in_training_the_final_one_in_eval_at_any_size():
    model = PSMNet(16, attention="efficient")
    left, right = torch.rand(2, 3, 32, 64), torch.rand(2, 3, 32, 64)
    outputs = model.train()(left, right)
    assert len(outputs) == 3 and all(out.shape == (2, 32, 64) for out in outputs)
    sum(out.mean() for out in outputs).backward()
    assert model.feature_extraction.attention.reprojection.weight.grad.abs().sum() > 0
    with torch.no_grad():
        (final,) = model.eval()(torch.rand(1, 3, 30, 50), torch.rand(1, 3, 30, 50))  # padded, cropped back
    assert final.shape == (1, 30, 50) and torch.isfinite(final).all()
    assert final.min() >= 0 and final.max() <= 15 + 1e-4  # a soft-argmin over disparities 0 .. 15


def test_a_batch_of_one_small_pair_in_training_says_what_is_needed():
    with pytest.raises(ValueError, match="batch of at least 2 or views of at least 512 x 256"):
        PSMNet(16).train()(torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 64))


def test_options_that_cannot_work_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"model.network must be one of \('attention', 'psmnet'\); got 'psm'"):
        StereoTask(max_disparity=32, network="psm")
    with pytest.raises(ValueError, match="model.psmnet_attention is 'efficient' but model.network is 'attention'"):
        StereoTask(max_disparity=32, psmnet_attention="efficient")
    with pytest.raises(UnknownNameError, match="Did you mean 'efficient'"):
        StereoTask(max_disparity=32, network="psmnet", psmnet_attention="eficient")
    with pytest.raises(ValueError, match="key_channels=64 is not divisible by num_heads=3"):
        PSMNet(32, attention="efficient", attention_heads=3)
    with pytest.raises(ValueError, match="max_disparity must be a positive multiple of 16"):
        PSMNet(40)


def test_the_task_builds_psmnet_and_refuses_a_checkpoint_of_another_mechanism():
    task = StereoTask(max_disparity=32, network="psmnet", psmnet_attention="efficient")
    assert isinstance(task.net, PSMNet) and task.backbone is task.net.feature_extraction
    assert count(task) == PSMNET_PARAMETERS + 49_536 and task.loss_weights == [0.5, 0.7, 1.0]
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                  "lattn": {"task": "StereoTask"}}
    other = StereoTask(max_disparity=32, network="psmnet", psmnet_attention="softmax")
    with pytest.raises(ValueError, match="attention: 'efficient' -> 'softmax'"):  # same weight shapes
        other.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="backbone: 'psmnet' -> 'pyramid_tiny'"):
        StereoTask(max_disparity=32).on_load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return ensure_synthetic_sceneflow(tmp_path_factory.mktemp("cache"), **TINY_SET)


def data_args(root: Path) -> list[str]:
    return ["--data.root", str(root), "--data.subsets", "[flyingthings3d]", "--model.max_disparity", "16",
            "--data.crop_size", "[32, 64]", "--data.batch_size", "2", "--data.eval_batch_size", "2",
            "--data.num_workers", "0", "--data.val_fraction", "0.5"]


def test_the_psmnet_config_runs_one_batch(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "sceneflow_psmnet.yaml"), *data_args(tiny_root),
          "--trainer.fast_dev_run", "1"])


@pytest.fixture(scope="module")
def ea_run(tiny_root, tmp_path_factory) -> tuple[Path, list[str]]:
    """One short `lattn fit` of the EA-PSMNet config (one training batch, one validation batch): its folder
    and the config arguments it ran with."""
    folder = tmp_path_factory.mktemp("ea_run")
    common = ["--config", str(CONFIGS / "sceneflow_ea_psmnet.yaml"), *data_args(tiny_root)]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
              "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"])
    return folder, common


def test_the_ea_psmnet_config_trains_and_its_checkpoint_loads_back(ea_run):
    folder, _ = ea_run
    last = folder / "checkpoints/sceneflow_ea_psmnet/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["network"] == "psmnet" and hparams["psmnet_attention"] == "efficient"
    assert hparams["max_disparity"] == 16 and hparams["lr"] == 0.001 and hparams["weight_decay"] == 0.0
    assert "psmnet_attention: efficient" in checkpoint["lattn"]["config"]

    restored = StereoTask.load_from_checkpoint(last).eval()
    assert isinstance(restored.net, PSMNet) and restored.net.feature_extraction.attention.attention_name == "efficient"
    assert restored.max_disparity == restored.net.max_disparity == 16
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(restored.state_dict()[key], value), key
    # ... and predicts what the trained weights predict (a task built from the hyperparameters, given them).
    rebuilt = StereoTask(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    rebuilt.load_state_dict(checkpoint["state_dict"])
    pair = torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(restored(*pair), rebuilt.eval()(*pair))



@pytest.mark.slow
def test_ea_psmnet_tests_and_predicts_from_its_checkpoint(ea_run, tiny_root, monkeypatch, capsys):
    folder, common = ea_run
    monkeypatch.chdir(folder)
    last = folder / "checkpoints/sceneflow_ea_psmnet/last.ckpt"
    main(["test", *common, "--ckpt_path", str(last)])
    assert "test_epe" in capsys.readouterr().out

    left = next(tiny_root.glob("FlyingThings3D/frames_cleanpass/TEST/*/*/left/*.png"))
    right = left.parents[1] / "right" / left.name
    main(["predict", *common, "--ckpt_path", str(last), "--data.predict_pairs", f"[[{left}, {right}]]"])
    (written,) = (folder / "predictions/sceneflow_ea_psmnet").rglob("*.pfm")
    disparity = read_pfm(written)
    assert disparity.shape == (32, 64) and np.isfinite(disparity).all()

    # The same checkpoint as PSMNet without attention: refused, naming what differs.
    with pytest.raises(ValueError, match="attention: 'efficient' -> 'none'"):
        StereoTask.load_from_checkpoint(last, psmnet_attention=None)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["sceneflow_psmnet.yaml", "sceneflow_ea_psmnet.yaml"])
def test_the_configs_run_one_batch_on_the_embedded_set_as_they_are(config, tmp_path, monkeypatch):
    """The configs unchanged on the embedded set (128 x 256 images whole, batch 12, max disparity 48)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp_path / "cache"))
    main(["fit", "--config", str(CONFIGS / config), "--trainer.fast_dev_run", "1"])


@pytest.mark.slow
def test_ea_psmnet_memory_against_psmnet_at_a_small_crop():
    from lattn_app.bench.claims import psmnet_memory

    cpu = torch.device("cpu")
    plain = psmnet_memory(None, None, (64, 128), 2, cpu, max_disparity=32)  # batch 1 is refused at this size
    efficient = psmnet_memory("efficient", None, (64, 128), 2, cpu, max_disparity=32)
    assert plain > 4 * PSMNET_PARAMETERS  # at least the fp32 weights
    assert 1.0 < efficient / plain < 1.5  # the module adds weights and activations


def test_smooth_l1_is_what_the_outputs_are_trained_with(tiny_root):
    task = StereoTask(max_disparity=16, network="psmnet")
    batch = {"left": torch.rand(2, 3, 32, 64), "right": torch.rand(2, 3, 32, 64),
             "disparity": torch.full((2, 32, 64), 5.0)}
    torch.manual_seed(1)
    loss = task.training_loss(batch)
    torch.manual_seed(1)
    outputs = task.net(task.normalize(batch["left"]), task.normalize(batch["right"]))
    expected = sum(w * F.smooth_l1_loss(out, batch["disparity"]) for w, out in zip((0.5, 0.7, 1.0), outputs))
    torch.testing.assert_close(loss, expected)
