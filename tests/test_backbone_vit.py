"""The isotropic ViT/ViX backbone and pretrained weight loading (timm files, lattn checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from lattn_app.backbones import create_backbone, list_backbones
from lattn_app.backbones.timm_weights import load_pretrained

from .helpers import ALL_MECHANISMS


def small_vit(**options):
    defaults = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    return create_backbone("vit", **{**defaults, **options}).eval()


def test_presets_have_timm_shapes_and_complexity():
    assert {"vit", "vit_tiny", "vit_small", "vit_base", "vix_cifar"} <= set(list_backbones())
    cost = create_backbone("vit_small").complexity(224)
    assert cost.params == sum(p.numel() for p in timm.create_model("vit_small_patch16_224").parameters())
    assert cost.gmacs == pytest.approx(4.6, rel=0.03)  # timm's published GMACs for ViT-S/16 at 224
    cifar = create_backbone("vix_cifar")
    assert cifar.grid_size == (32, 32) and len(cifar.blocks) == 4 and cifar.blocks[0].mlp.fc1.out_features == 256


@pytest.mark.parametrize("attention", ALL_MECHANISMS)
def test_every_mechanism_runs_inside_the_vit(attention):
    model = small_vit(attention=attention)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5) and logits.isfinite().all()


@pytest.mark.parametrize(
    "options",
    [dict(stem="conv"), dict(pos_embed="rope", attention="efficient"), dict(pos_embed="sincos"),
     dict(class_token=False, global_pool="avg"), dict(stem="conv", patch_size=1, img_size=8),
     dict(stem="xformers"), dict(stem="xformers", patch_size=1, img_size=8),
     dict(pos_embed="rope1d", attention="performer"), dict(norm_eps=1e-5)],
)
def test_variants_build_and_run(options):
    size = options.get("img_size", 32)
    model = small_vit(**options)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_rope_replaces_the_absolute_embedding_and_reaches_the_attention():
    model = small_vit(pos_embed="rope", attention="efficient")
    assert model.pos_embed is None and model.blocks[0].attn.rope is not None
    with pytest.raises(ValueError, match="pos_embed='rope' needs a mechanism that supports RoPE; 'fnet' does not"):
        small_vit(pos_embed="rope", attention="fnet")


def test_rope1d_reaches_every_attention_layer_in_its_1d_form():
    model = small_vit(pos_embed="rope1d", attention="softmax")
    assert model.pos_embed is None
    assert all(block.attn.rope.form == "1d" and block.attn.rope.base == 10_000 for block in model.blocks)
    assert small_vit(pos_embed="rope", attention="softmax").blocks[0].attn.rope.base == 100  # 2D default


def test_other_image_sizes_at_run_time():
    model = small_vit()
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 5)  # positions resampled to a 12 x 10 grid
    maps = model.forward_pyramid(torch.randn(1, 3, 48, 40))
    assert [m.shape for m in maps] == [torch.Size([1, 64, 12, 10])]
    assert model.out_channels == [64] and model.strides == [4]
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by the patch size 4"):
        model(torch.randn(1, 3, 30, 32))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="stem must be one of .*got 'cnn'"):
        small_vit(stem="cnn")
    with pytest.raises(TypeError, match="backbone 'vit' has no option 'embed_dims'. Did you mean 'embed_dim'"):
        create_backbone("vit", embed_dims=64)


@pytest.fixture(scope="module")
def timm_vit_small_file(tmp_path_factory):
    """A timm vit_small_patch16_224 state dict saved as safetensors, as a user would save it."""
    torch.manual_seed(1)
    model = timm.create_model("vit_small_patch16_224").eval()
    path = tmp_path_factory.mktemp("weights") / "vit_small_patch16_224.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_timm_weights_reproduce_timm_outputs_with_softmax_attention(timm_vit_small_file):
    timm_model, path = timm_vit_small_file
    model = create_backbone("vit_small", pretrained=str(path)).eval()
    assert not model.load_report.missing and not model.load_report.unexpected
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(images), timm_model(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["efficient", "performer", "nystrom", "care", "linformer"])
def test_timm_weights_load_into_other_mechanisms(timm_vit_small_file, attention):
    _, path = timm_vit_small_file
    model = create_backbone("vit_small", attention=attention, num_classes=10, pretrained=str(path))
    report = model.load_report
    assert not any(".attn.qkv." in key or ".attn.proj." in key for key in report.missing), report.missing
    assert report.reinitialised_head == ["head.weight", "head.bias"]
    extra = {"linformer": "attn.key_projection", "nystrom": "attn.residual_conv.weight",
             "performer": "attn.projection"}.get(attention)
    if extra:
        assert any(extra in key for key in report.missing)  # reported as initialised, by name
    else:
        assert report.missing == ["head.weight", "head.bias"] or not report.missing


def test_position_embedding_is_resampled_to_another_grid(timm_vit_small_file):
    _, path = timm_vit_small_file
    model = create_backbone("vit_small", img_size=160, pretrained=str(path))
    assert model.load_report.resampled == ["pos_embed 14x14 -> 10x10"]
    assert model.pos_embed.shape == (1, 1 + 100, 384)


def test_shape_mismatch_names_the_key_and_both_shapes(timm_vit_small_file):
    _, path = timm_vit_small_file
    with pytest.raises(ValueError, match=r"pretrained key '[\w.]+' has shape \([^)]*384,?\) in .* but \([^)]*192,?\) in the model"):
        create_backbone("vit_tiny", pretrained=str(path))


def test_lattn_checkpoint_weights_load_from_their_backbone_prefix(tmp_path):
    source = small_vit(attention="efficient")
    checkpoint = {"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    checkpoint["state_dict"]["criterion.weight"] = torch.ones(5)
    path = tmp_path / "run.ckpt"
    torch.save(checkpoint, path)
    target = small_vit(attention="efficient")
    report = load_pretrained(target, str(path))
    assert not report.missing and not report.unexpected
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(target(images), source(images))


def test_bad_pretrained_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        small_vit(pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="'not_a_model' is neither an existing file nor a timm model name"):
        small_vit(pretrained="not_a_model")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not read pretrained weights from .*corrupt.safetensors"):
        small_vit(pretrained=str(corrupt))


def test_timm_name_without_network_explains_how_to_use_a_file():
    script = (
        "from lattn_app.backbones.timm_weights import read_state_dict\n"
        "try:\n    read_state_dict('vit_tiny_patch16_224')\nexcept RuntimeError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "could not fetch the pretrained weights of 'vit_tiny_patch16_224'" in out
    assert "pass the file's path as pretrained" in out
