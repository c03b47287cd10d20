"""CARE Transformer backbones: published size and cost, interface shapes, dynamic memory, attention swap."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import lattn_app.backbones.care as care
from lattn_app.attention import attention_info
from lattn_app.backbones import create_backbone
from lattn_app.backbones.base import count_complexity
from lattn_app.registry import BACKBONES

# Published ImageNet-1K figures at 224x224: (params in M, GMACs).
PUBLISHED = {"care_s0": (7.3, 0.7), "care_s1": (9.6, 1.0), "care_s2": (19.5, 1.9)}
TOLERANCE = 0.03


def small_model(**options) -> care.CareTransformer:
    options.setdefault("num_classes", 10)
    return create_backbone("care_s0", **options)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_gmacs_match_the_paper(name):
    params_m, gmacs = PUBLISHED[name]
    measured = count_complexity(BACKBONES.create(name), 224)
    assert measured.params_m == pytest.approx(params_m, rel=TOLERANCE), str(measured)
    assert measured.gmacs == pytest.approx(gmacs, rel=TOLERANCE), str(measured)


def test_variants_are_registered():
    for name in PUBLISHED:
        assert name in BACKBONES
        assert isinstance(BACKBONES.create(name, num_classes=3), care.CareTransformer)


def test_unknown_option_is_refused_by_name():
    with pytest.raises(TypeError, match="drop_path_rat"):
        BACKBONES.create("care_s0", drop_path_rat=0.1)


def test_eval_gives_logits_and_training_gives_class_and_distillation_logits():
    model = small_model().eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(images)
        features = model.forward_features(images)
        pooled = features.mean(dim=(2, 3))
        expected = (model.head(pooled) + model.dist_head(pooled)) / 2
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, expected)

    model.train()
    out = model(images)
    assert isinstance(out, tuple) and len(out) == 2
    assert all(t.shape == (2, 10) for t in out)
    assert not torch.allclose(out[0], out[1])  # two heads, not one returned twice


def test_without_distillation_there_is_one_head():
    model = small_model(distillation=False).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    assert model.dist_head is None


def test_num_classes_zero_gives_the_embedding():
    model = small_model(num_classes=0).train()
    images = torch.randn(2, 3, 64, 64)
    assert model(images).shape == (2, model.num_features) == (2, 1024)
    classifier = small_model().eval()
    assert classifier.forward_head(classifier.forward_features(images), pre_logits=True).shape == (2, 1024)


@pytest.mark.parametrize("size", [(160, 224), (100, 150)])
def test_pyramid_levels_have_the_declared_strides_and_channels(size):
    model = small_model().eval()
    height, width = size
    with torch.no_grad():
        levels = model.forward_pyramid(torch.randn(2, 3, height, width))
    assert model.strides == [4, 8, 16, 32]
    assert model.out_channels == [32, 64, 128, 1024]
    assert len(levels) == 4
    # Sides that are not multiples of 32 are zero-padded up to the next multiple first.
    padded_height, padded_width = 32 * math.ceil(height / 32), 32 * math.ceil(width / 32)
    for level, channels, stride in zip(levels, model.out_channels, model.strides):
        assert level.shape == (2, channels, padded_height // stride, padded_width // stride)
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, height, width))
    assert features.shape == levels[-1].shape


def test_block_reads_memory_from_its_first_channels_and_mixes_it_only_in_the_second_interaction():
    g = 8
    block = care.CareBlock(dim=4 * g, memory_dim=g, ratios=(2, 2)).eval()
    torch.nn.init.ones_(block.layer_scale.gamma)  # make the interaction visible next to the residual
    seen = []
    block.feature_interaction.register_forward_hook(lambda m, args, out: seen.append(args[0]))

    x = torch.randn(1, 4 * g, 8, 8)
    perturbed = x.clone()
    perturbed[:, :g] += torch.randn(1, g, 8, 8)
    with torch.no_grad():
        out, out_perturbed = block(x), block(perturbed)

    torch.testing.assert_close(seen[0], seen[1])  # the decoupled features do not see the memory
    # ... yet the memory changes the non-memory output channels: via the memory interaction only.
    assert (out[:, g:] - out_perturbed[:, g:]).abs().max() > 1e-3


def test_first_output_channels_of_a_block_are_the_next_blocks_memory():
    model = small_model().eval()
    blocks = model.stages[1].blocks  # stage 2: g = 16, two or more blocks
    g = blocks[1].memory_dim
    outputs, memory_inputs = [], []
    blocks[0].register_forward_hook(lambda m, args, out: outputs.append(out))
    blocks[1].memory_interaction.register_forward_hook(lambda m, args, out: memory_inputs.append(args[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    # The second interaction of block 2 works on cat(memory, mixed): its memory is block 1's first g.
    torch.testing.assert_close(memory_inputs[0][:, :g], outputs[0][:, :g])


def test_layer_scale_starts_at_1e6_and_the_last_block_widens_to_the_classifier():
    model = create_backbone("care_s0")
    blocks = [block for stage in model.stages for block in stage.blocks]
    assert len(blocks) == 18
    for block in blocks[:-1]:
        assert torch.all(block.layer_scale.gamma == 1e-6)
    last = blocks[-1]
    assert last.layer_scale is None and last.memory_interaction.project is None
    assert last.out_channels == model.num_features == 1024
    assert create_backbone("care_s2").num_features == 1536


def test_stages_three_and_four_use_care_linear_attention_with_the_paper_head_sizes():
    model = create_backbone("care_s2")
    care_class = attention_info("care").builder
    for stage, head_size in zip(model.stages[2:], (16, 32)):
        attn = stage.blocks[0].decoupling.attention_mixer.attn
        assert isinstance(attn, care_class)
        assert attn.head_dim == head_size and not attn.value_projection
        assert isinstance(attn.proj, torch.nn.Identity)
    for stage in model.stages[:2]:
        assert isinstance(stage.blocks[0].decoupling.attention_mixer, care.StripConvMixer)


def test_attention_mixer_computes_the_care_formula_on_maps():
    g, head_size = 32, 16
    mixer = care.AttentionMixer(g, head_size).eval()
    x = torch.randn(2, g, 5, 7)
    qk = F.conv2d(x, mixer.attn.qkv.weight[:, :, None, None], mixer.attn.qkv.bias)  # a 1x1 conv
    q, k = qk.flatten(2).chunk(2, dim=1)
    v = x.flatten(2)

    def heads(t):  # (B, C, N) -> (B, h, N, d)
        return t.unflatten(1, (g // head_size, head_size)).transpose(-2, -1)

    phi_q, phi_k, v = F.elu(heads(q)) + 1, F.elu(heads(k)) + 1, heads(v)
    kv = phi_k.transpose(-2, -1) @ v / v.shape[-2]
    z = 1 / (phi_q @ phi_k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    expected = ((phi_q @ kv) * z).transpose(-2, -1).flatten(1, 2).unflatten(2, (5, 7))
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), expected)


def test_attention_can_be_swapped_for_another_registered_mechanism():
    model = small_model(attention="efficient").eval()
    attn = model.stages[3].blocks[0].decoupling.attention_mixer.attn
    assert isinstance(attn, attention_info("efficient").builder)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 96, 64))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_training_step_backpropagates_with_drop_path():
    model = small_model(drop_path_rate=0.1).train()
    logits, distill_logits = model(torch.randn(2, 3, 64, 64))
    (logits.sum() + distill_logits.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bad_configurations_name_the_values():
    with pytest.raises(ValueError, match="dim=30, memory_dim=8"):
        care.CareBlock(dim=30, memory_dim=8, ratios=(2, 2))
    with pytest.raises(ValueError, match="24 must be a multiple of the head size 16"):
        care.AttentionMixer(24, 16)
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone("care_s0", num_classes=-1)


def test_pretrained_weights_load_into_a_fresh_model(tmp_path):
    source = create_backbone("care_s0", num_classes=0)
    torch.save(source.state_dict(), tmp_path / "care.pth")
    loaded = create_backbone("care_s0", num_classes=0, pretrained=str(tmp_path / "care.pth"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    torch.save({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor of .*other.pth matches"):
        create_backbone("care_s0", num_classes=0, pretrained=str(tmp_path / "other.pth"))
