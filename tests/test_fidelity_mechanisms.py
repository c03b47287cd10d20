"""lattn's mechanisms against the authors' released packages, built side by side in float64.

Each test builds the reference layer from its PyPI package (performer-pytorch 1.1.4, linformer 0.2.3,
nystrom-attention 0.0.14: the `dev` extra), copies its weights into lattn's layer parameter by parameter
and asserts equal outputs and equal gradients with respect to the input. The mappings are the ones
docs/fidelity.md lists; a wrong mapping or formula fails these tests (checked by breaking each one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lattn_app.attention import create_attention
from lattn_app.backbones import create_backbone

from .helpers import TIGHT

performer_pytorch = pytest.importorskip("performer_pytorch")
linformer = pytest.importorskip("linformer")
nystrom_attention = pytest.importorskip("nystrom_attention")

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_function(ours: nn.Module, reference: nn.Module, x: torch.Tensor, ours_kwargs=None,
                         reference_kwargs=None, tolerance=TIGHT) -> None:
    """Equal outputs and equal input gradients (for one random output gradient)."""
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours = ours(x_ours, **(ours_kwargs or {}))
    out_ref = reference(x_ref, **(reference_kwargs or {}))
    torch.testing.assert_close(out_ours, out_ref, **tolerance)
    grad = torch.randn_like(out_ref)
    (out_ours * grad).sum().backward()
    (out_ref * grad).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tolerance)


@torch.no_grad()
def copy_(target: torch.Tensor, source: torch.Tensor) -> None:
    assert target.shape == source.shape, (target.shape, source.shape)
    target.copy_(source)


# ---------------------------------------------------------------------------------------------- performer

def performer_pair(dim=32, heads=2, features=20, **options):
    torch.manual_seed(0)
    reference = performer_pytorch.SelfAttention(dim, heads=heads, dim_head=dim // heads, nb_features=features,
                                                qkv_bias=True, attn_out_bias=True).double().eval()
    ours = create_attention("performer", dim=dim, num_heads=heads, num_features=features, redraw_interval=None,
                            **options).double().eval()
    with torch.no_grad():
        copy_(ours.qkv.weight, torch.cat([reference.to_q.weight, reference.to_k.weight, reference.to_v.weight]))
        copy_(ours.qkv.bias, torch.cat([reference.to_q.bias, reference.to_k.bias, reference.to_v.bias]))
        copy_(ours.proj.weight, reference.to_out.weight)
        copy_(ours.proj.bias, reference.to_out.bias)
        copy_(ours.projection, reference.fast_attention.projection_matrix)
    return ours, reference


def test_performer_with_the_references_epsilon_equals_performer_pytorch():
    ours, reference = performer_pair(kernel_epsilon=1e-4)
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    assert_same_function(ours, reference, x)


def test_performer_paper_form_differs_from_the_reference_only_by_its_epsilon():
    ours, reference = performer_pair()  # kernel_epsilon=0: the paper's formula
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        difference = (ours(x) - reference(x)).abs().max() / reference(x).abs().max()
    assert 0 < difference < 1e-2  # small at these logits, but not round-off: the epsilon biases the estimate


def test_performer_batch_stabiliser_is_the_x_formers_vendored_kernel():
    """The X-formers' copy of the kernel takes the keys' maximum over the whole batch (written out here)."""
    ours = create_attention("performer", dim=16, num_heads=2, num_features=12, kernel_epsilon=1e-4,
                            stabiliser="batch").double()
    keys = torch.randn(3, 2, 10, 8, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[:, None, None, None]
    scaled = keys * 8**-0.25
    projected = scaled @ ours.projection.T
    expected = 12**-0.5 * (torch.exp(projected - 0.5 * (scaled**2).sum(-1, keepdim=True) - projected.max()) + 1e-4)
    torch.testing.assert_close(ours.feature_map(keys, is_query=False), expected, **TIGHT)


def test_performer_layers_draw_independent_features_reproducibly():
    def build():
        return create_backbone("vit", img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2,
                               attention="performer", num_classes=0)

    first, second = build(), build()
    draws = [block.attn.projection for block in first.blocks]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    assert all(torch.equal(a.attn.projection, b.attn.projection) for a, b in zip(first.blocks, second.blocks))
    # A redraw is a function of (feature_seed, layer_index, redraw count) only: a rank or a resumed run that
    # reaches redraw 1 draws the same matrix.
    layer = first.blocks[1].attn
    layer.redraw_features()
    again = create_attention("performer", dim=32, num_heads=2, layer_index=1)
    torch.testing.assert_close(layer.projection, again._draw(1), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- RoPE

def test_rope_1d_equals_the_x_formers_rotary_embedding():
    """performer-pytorch's rotary embedding (the one the X-formers' ViXRoPE scripts use): its sin/cos table
    equals lattn's 1D angles (the reference tabulates in float32), and applying it equals lattn's rotation."""
    ours, reference = performer_pair(kernel_epsilon=1e-4, rope=True, rope_form="1d")
    tokens, head_dim = 17, 16
    table = performer_pytorch.performer_pytorch.FixedPositionalEmbedding(head_dim, tokens)
    angles = ours.rope.angles(tokens, torch.device("cpu"), torch.float64)
    ours_table = torch.cat([angles.sin(), angles.cos()], dim=-1)
    torch.testing.assert_close(table.emb.double(), ours_table, rtol=0, atol=1e-5)
    x = torch.randn(2, tokens, 32, dtype=torch.float64)
    assert_same_function(ours, reference, x, reference_kwargs={"pos_emb": ours_table[None]})


# ---------------------------------------------------------------------------------------------- linformer

LINFORMER_LAYOUTS = [  # (one_kv_head, share_kv, lattn sharing)
    (False, False, "headwise"),
    (True, False, "headwise"),
    (False, True, "key-value"),
    (True, True, "key-value"),  # the X-formers' ViL
]


def linformer_pair(one_kv_head, share_kv, sharing, grid=(4, 5), prefix=1, dim=32, heads=4, k=6):
    torch.manual_seed(0)
    seq_len = prefix + grid[0] * grid[1]
    reference = linformer.LinformerSelfAttention(dim, seq_len, k=k, heads=heads, dim_head=dim // heads,
                                                 one_kv_head=one_kv_head, share_kv=share_kv).double().eval()
    ours = create_attention("linformer", dim=dim, num_heads=heads, grid_size=grid, k=k, sharing=sharing,
                            one_kv_head=one_kv_head, share_kv=share_kv, project_prefix=prefix > 0,
                            num_prefix_tokens=prefix, qkv_bias=False).double().eval()
    weights = [reference.to_q.weight, reference.to_k.weight] + ([] if share_kv else [reference.to_v.weight])
    with torch.no_grad():
        copy_(ours.qkv.weight, torch.cat(weights))
        copy_(ours.key_projection, reference.proj_k.T)
        if sharing == "headwise":
            copy_(ours.value_projection, reference.proj_v.T)
        copy_(ours.proj.weight, reference.to_out.weight)
        copy_(ours.proj.bias, reference.to_out.bias)
    return ours, reference


@pytest.mark.parametrize("one_kv_head, share_kv, sharing", LINFORMER_LAYOUTS)
def test_linformer_layouts_equal_lucidrains_linformer(one_kv_head, share_kv, sharing):
    ours, reference = linformer_pair(one_kv_head, share_kv, sharing)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    assert_same_function(ours, reference, x, ours_kwargs={"hw": (4, 5)})


def test_linformer_default_route_equals_the_reference_without_prefix_tokens():
    """lattn's default layout (compress-then-project autograd function) is the reference's untied layout."""
    ours, reference = linformer_pair(False, False, "headwise", prefix=0)
    assert ours.fused_route
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    assert_same_function(ours, reference, x, ours_kwargs={"hw": (4, 5)})


def test_linformer_parameter_counts_of_both_layouts_at_n_256():
    """Width 128, 4 heads, N = 256, k = 64: the reference's ViL layout and the default untied one."""
    def count(module):
        return sum(p.numel() for p in module.parameters())

    x_formers = create_attention("linformer", dim=128, num_heads=4, grid_size=(16, 16), sharing="key-value",
                                 one_kv_head=True, share_kv=True, project_prefix=True, qkv_bias=False)
    default = create_attention("linformer", dim=128, num_heads=4, grid_size=(16, 16), qkv_bias=False)
    reference_vil = linformer.LinformerSelfAttention(128, 256, k=64, heads=4, dim_head=32, one_kv_head=True,
                                                     share_kv=True)
    reference_untied = linformer.LinformerSelfAttention(128, 256, k=64, heads=4, dim_head=32)
    assert count(x_formers) == count(reference_vil) == 53_376
    assert count(default) == count(reference_untied) == 98_432


def test_linformer_layerwise_sharing_ties_one_projection_across_layers():
    model = create_backbone("vit", img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2, num_classes=3,
                            attention="linformer", attention_options={"k": 4, "sharing": "layerwise"})
    projections = {id(block.attn.key_projection) for block in model.blocks}
    assert len(projections) == 1 and not hasattr(model.blocks[0].attn, "value_projection")
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model.blocks[0].attn.key_projection.grad is not None
    with pytest.raises(ValueError, match="share_kv"):
        create_attention("linformer", dim=32, num_heads=2, share_kv=True)


# ------------------------------------------------------------------------------------------------ nystrom

def nystrom_pair(heads, iterations, dim_head=8, landmarks=4, kernel=5):
    torch.manual_seed(0)
    dim = heads * dim_head
    reference = nystrom_attention.NystromAttention(dim, dim_head=dim_head, heads=heads, num_landmarks=landmarks,
                                                   pinv_iterations=iterations, residual=True,
                                                   residual_conv_kernel=kernel).double().eval()
    ours = create_attention("nystrom", dim=dim, num_heads=heads, num_landmarks=landmarks,
                            pinv_iterations=iterations, conv_kernel=kernel, qkv_bias=False).double().eval()
    with torch.no_grad():
        copy_(ours.qkv.weight, reference.to_qkv.weight)
        copy_(ours.proj.weight, reference.to_out[0].weight)
        copy_(ours.proj.bias, reference.to_out[0].bias)
        copy_(ours.residual_conv.weight, reference.res_conv.weight)
    return ours, reference, dim


def test_nystrom_equals_nystrom_attention_for_one_matrix():
    """One sample, one head: the pseudo-inverse's starting scale is the same (per matrix = over the batch)."""
    ours, reference, dim = nystrom_pair(heads=1, iterations=6)
    assert_same_function(ours, reference, torch.randn(1, 16, dim, dtype=torch.float64))


def test_nystrom_equals_nystrom_attention_once_the_pseudo_inverse_has_converged():
    """Batches and heads: the reference scales the Newton start by norms over the whole batch (lattn per
    matrix), so the two agree once the iteration has converged, here after 30 steps."""
    ours, reference, dim = nystrom_pair(heads=2, iterations=30)
    assert_same_function(ours, reference, torch.randn(3, 16, dim, dtype=torch.float64),
                         tolerance=dict(rtol=1e-9, atol=1e-10))
