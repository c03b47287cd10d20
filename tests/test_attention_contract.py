"""The token-mixer contract (docs/architecture.md#token-mixer-contract), checked for every registered mechanism."""

from __future__ import annotations

import pytest
import torch

from lattn_app.attention import attention_info, create_attention, list_attentions

from .helpers import ALL_MECHANISMS, LINEAR_MECHANISMS, build

CROSS = [name for name in ALL_MECHANISMS if attention_info(name).cross]
NO_CROSS = [name for name in ALL_MECHANISMS if not attention_info(name).cross]
ROPE = [name for name in ALL_MECHANISMS if attention_info(name).rope]


def test_every_paper_mechanism_is_registered():
    assert set(ALL_MECHANISMS) <= set(list_attentions())
    assert set(ROPE) == {"softmax", "efficient", "performer", "nystrom", "linformer", "care"}


@pytest.mark.parametrize("name", ALL_MECHANISMS)
def test_maps_prefix_plus_grid_tokens_to_the_same_shape(name):
    # The acceptance shape: (2, 1 + 12*20, 64) with hw=(12, 20); fixed-size mechanisms built for that grid.
    options = {"grid_size": (12, 20)} if attention_info(name).fixed_grid else {}
    if name == "mixer":
        options["num_prefix_tokens"] = 1
    module = create_attention(name, dim=64, num_heads=4, **options)
    x = torch.randn(2, 1 + 12 * 20, 64)
    out = module(x, hw=(12, 20))
    assert out.shape == x.shape
    assert out.isfinite().all()


@pytest.mark.parametrize("name", ALL_MECHANISMS)
@pytest.mark.parametrize(("hw", "prefix"), [((3, 11), 0), ((7, 2), 3), ((1, 9), 1)])
def test_non_square_grids_and_prefix_tokens(name, hw, prefix):
    module = build(name, dim=32, num_heads=2, hw=hw, prefix=prefix)
    x = torch.randn(2, prefix + hw[0] * hw[1], 32)
    out = module(x, hw=hw)
    assert out.shape == x.shape and out.isfinite().all()


@pytest.mark.parametrize("name", ALL_MECHANISMS)
def test_samples_are_independent(name):
    module = build(name, dim=32, num_heads=2, hw=(4, 6))
    x = torch.randn(3, 1 + 24, 32)
    reference = module(x, hw=(4, 6))[0]
    changed = x.clone()
    changed[1:] = torch.randn(2, 25, 32) * 50  # other samples, much larger activations
    torch.testing.assert_close(module(changed, hw=(4, 6))[0], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_MECHANISMS)
def test_gradients_are_finite_and_reach_input_and_parameters(name):
    module = build(name, dim=32, num_heads=2, hw=(5, 6)).train()
    x = torch.randn(2, 1 + 30, 32, requires_grad=True)
    module(x, hw=(5, 6)).square().mean().backward()
    assert x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum() > 0
    for param_name, param in module.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert param.grad.isfinite().all(), f"{name}: non-finite gradient for {param_name}"


@pytest.mark.parametrize("name", ALL_MECHANISMS)
def test_bf16_autocast_is_close_to_fp32(name):
    module = build(name, dim=64, num_heads=4, hw=(8, 10))
    x = torch.randn(2, 1 + 80, 64)
    reference = module(x, hw=(8, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(x, hw=(8, 10))
    assert low.isfinite().all()
    error = ((low.float() - reference).norm() / reference.norm()).item()
    assert error < 0.05, f"{name}: bf16 relative error {error:.3f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LINEAR_MECHANISMS)
def test_large_tokens_and_activations_stay_finite_under_autocast(name, dtype):
    module = build(name, dim=64, num_heads=4, hw=(64, 64), prefix=0)
    x = torch.randn(1, 64 * 64, 64) * 30
    with torch.autocast("cpu", dtype=dtype):
        out = module(x, hw=(64, 64))
    assert out.isfinite().all()


@pytest.mark.parametrize("name", CROSS)
def test_cross_attention_with_itself_equals_self_attention(name):
    options = {"conv_kernel": None} if name == "nystrom" else {}  # its conv residual is self-attention only
    module = build(name, dim=32, num_heads=2, hw=(4, 5), **options)
    x = torch.randn(2, 1 + 20, 32)
    torch.testing.assert_close(module(x, hw=(4, 5), context=x, context_hw=(4, 5)), module(x, hw=(4, 5)))


@pytest.mark.parametrize("name", CROSS)
def test_cross_attention_reads_keys_and_values_from_the_context(name):
    module = build(name, dim=32, num_heads=2, hw=(4, 5))
    x = torch.randn(2, 1 + 20, 32)
    # A context of another size where the method allows it; coupling needs the same grid.
    context_hw = (4, 5) if name == "coupling" else (6, 3)
    context = torch.randn(2, 1 + context_hw[0] * context_hw[1], 32)
    out = module(x, hw=(4, 5), context=context, context_hw=context_hw)
    assert out.shape == x.shape and out.isfinite().all()
    other = module(x, hw=(4, 5), context=torch.randn_like(context), context_hw=context_hw)
    assert not torch.allclose(out, other)


@pytest.mark.parametrize("name", NO_CROSS)
def test_cross_attention_is_refused_where_the_method_has_none(name):
    module = build(name, dim=32, num_heads=2, hw=(4, 5))
    x = torch.randn(1, 21, 32)
    with pytest.raises(ValueError, match="does not support cross-attention"):
        module(x, hw=(4, 5), context=x, context_hw=(4, 5))


def test_coupling_refuses_a_context_on_another_grid():
    module = build("coupling", dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r"context grid \(5, 4\) must equal the query grid \(4, 5\)"):
        module(torch.randn(1, 20, 32), hw=(4, 5), context=torch.randn(1, 20, 32), context_hw=(5, 4))


@pytest.mark.parametrize("name", ROPE)
def test_rope_changes_the_output_and_keeps_the_contract(name):
    plain = build(name, dim=32, num_heads=2, hw=(4, 6))
    rotary = build(name, dim=32, num_heads=2, hw=(4, 6), rope=True)
    rotary.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 1 + 24, 32)
    out = rotary(x, hw=(4, 6))
    assert out.shape == x.shape and out.isfinite().all()
    assert not torch.allclose(out, plain(x, hw=(4, 6)))


@pytest.mark.parametrize("name", sorted(set(ALL_MECHANISMS) - set(ROPE)))
def test_rope_is_refused_where_it_is_not_meaningful(name):
    with pytest.raises(TypeError, match="has no option 'rope'"):
        build(name, dim=32, num_heads=2, rope=True)


@pytest.mark.parametrize("name", ["linformer", "mixer"])
def test_fixed_grid_mechanisms_resample_to_other_grids(name):
    module = build(name, dim=32, num_heads=2, hw=(6, 8), prefix=1)
    x = torch.randn(2, 1 + 6 * 8, 32)
    torch.testing.assert_close(module(x, hw=(6, 8)), module(x, hw=(6, 8)))
    bigger = torch.randn(2, 1 + 9 * 12, 32)
    out = module(bigger, hw=(9, 12))
    assert out.shape == bigger.shape and out.isfinite().all()


def test_linformer_resampling_keeps_the_compressed_sums():
    module = build("linformer", dim=32, num_heads=2, hw=(6, 8), prefix=0)
    constant = torch.ones(1, 2, 6 * 8, 16)
    on_built = module.compress(constant, module.key_projection, (6, 8))
    on_double = module.compress(torch.ones(1, 2, 12 * 16, 16), module.key_projection, (12, 16))
    torch.testing.assert_close(on_double, on_built, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ["linformer", "mixer"])
def test_fixed_grid_mechanisms_can_refuse_other_grids(name):
    module = build(name, dim=32, num_heads=2, hw=(6, 8), prefix=0, on_other_grid="error")
    with pytest.raises(ValueError, match="built for a 6x8 token grid and got 7x8; it supports only 6x8"):
        module(torch.randn(1, 56, 32), hw=(7, 8))


def test_mixer_refuses_another_prefix_count():
    module = build("mixer", dim=32, hw=(4, 4), prefix=1)
    with pytest.raises(ValueError, match="built for 1 prefix tokens; x has 2"):
        module(torch.randn(1, 18, 32), hw=(4, 4))


def test_shape_errors_name_the_shapes():
    module = build("efficient", dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r"grid \(5, 5\) of x has 25 tokens but x has only 20"):
        module(torch.randn(1, 20, 32), hw=(5, 5))
    with pytest.raises(ValueError, match="built for width 32; x has width 16"):
        module(torch.randn(1, 20, 16), hw=(4, 5))
    with pytest.raises(ValueError, match=r"shape \(B, N, C\); got shape \(20, 32\)"):
        module(torch.randn(20, 32), hw=(4, 5))
    with pytest.raises(ValueError, match="width 30 must be divisible by num_heads; got num_heads=4"):
        create_attention("efficient", dim=30, num_heads=4)


@pytest.mark.parametrize("name", LINEAR_MECHANISMS)
def test_linear_mechanisms_handle_65536_tokens_on_the_cpu(name):
    # 256 x 256 grid, dim 64, 4 heads, batch 1: a materialised softmax map would need 4 * 65536^2 * 4 B = 68 GB.
    module = build(name, dim=64, num_heads=4, hw=(256, 256), prefix=0).train()
    x = torch.randn(1, 256 * 256, 64, requires_grad=True)
    out = module(x, hw=(256, 256))
    out.mean().backward()
    assert out.shape == x.shape and out.isfinite().all() and x.grad.isfinite().all()
