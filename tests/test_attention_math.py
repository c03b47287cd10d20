"""Each mechanism against the explicit formula of its paper (docs/methods.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lattn_app.attention import fnet
from lattn_app.attention.base import QKVAttention
from lattn_app.attention.nystrom import newton_pinv, segment_means
from lattn_app.attention.rope import RotaryEmbedding1D, RotaryEmbedding2D

from .helpers import build, heads, merge


def exact_softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- efficient


def test_efficient_scaling_equals_dot_product_over_n():
    module = build("efficient", normalization="scaling", prefix=1)
    x = torch.randn(2, 1 + 6 * 9, 64, dtype=torch.float64)
    module.double()
    q, k, v = heads(module, x)
    n = x.shape[1]
    expected = merge(module, (q @ k.transpose(-2, -1)) @ v / n)  # the N x N map, explicitly
    torch.testing.assert_close(module(x, hw=(6, 9)), expected)


@pytest.mark.parametrize("tokens, chunk_rows", [(7, 1024), (37, 1024), (37, 5), (64, 16)])
def test_efficient_written_out_backward_equals_autograd_of_the_formula(tokens, chunk_rows, monkeypatch):
    """The hand-written, chunked backward pass against autograd through softmax_d(q) (softmax_N(k)^T v):
    one chunk, several (the last one short), and gradcheck's numerical derivatives."""
    import lattn_app.attention.efficient as efficient

    monkeypatch.setattr(efficient, "CHUNK_ROWS", chunk_rows)
    generator = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(2, 3, tokens, 8, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn(2, 3, tokens, 8, generator=generator, dtype=torch.float64)
    out = efficient.efficient_attention(q, k, v)
    expected = q.softmax(dim=-1) @ (k.softmax(dim=-2).transpose(-2, -1) @ v)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    assert torch.autograd.gradcheck(efficient.efficient_attention, (q[:1, :1], k[:1, :1], v[:1, :1]))


@pytest.mark.parametrize("temperature", [False, True])
def test_efficient_softmax_equals_explicit_reconstruction(temperature):
    module = build("efficient", temperature=temperature).double()
    x = torch.randn(2, 1 + 5 * 7, 64, dtype=torch.float64)
    q, k, v = heads(module, x)
    if temperature:
        q, k = q * 16**-0.25, k * 16**-0.25
    implied_map = torch.softmax(q, dim=-1) @ torch.softmax(k, dim=-2).transpose(-2, -1)  # N x N
    torch.testing.assert_close(implied_map.sum(-1), torch.ones_like(implied_map.sum(-1)))  # rows sum to 1
    torch.testing.assert_close(module(x, hw=(5, 7)), merge(module, implied_map @ v))


# ---------------------------------------------------------------- coupling


def coupled_reference(q, k, v, hw, variant, scale):
    """Per head, build A and B from their definitions and apply kron(A, B) to each channel of v."""
    b, h, n, d = q.shape
    height, width = hw
    out = torch.empty_like(v)
    for bi in range(b):
        for hi in range(h):
            qg, kg, vg = (t[bi, hi].reshape(height, width, d) for t in (q, k, v))
            if variant == "pooling":
                qg, kg = qg.amax(-1, keepdim=True), kg.amax(-1, keepdim=True)
            q_rows, k_rows = qg.reshape(height, -1), kg.reshape(height, -1)  # H x (W d)
            q_cols, k_cols = qg.transpose(0, 1).reshape(width, -1), kg.transpose(0, 1).reshape(width, -1)
            row_map = torch.softmax(q_rows @ k_rows.T * scale, dim=-1)
            col_map = torch.softmax(q_cols @ k_cols.T * scale, dim=-1)
            coupled = torch.kron(row_map, col_map)  # (HW x HW), row-major grid order
            out[bi, hi] = coupled @ vg.reshape(height * width, d)
    return out


@pytest.mark.parametrize("variant", ["concat", "pooling"])
def test_coupling_equals_kronecker_map_on_non_square_grid(variant):
    hw = (5, 8)
    module = build("coupling", dim=32, num_heads=4, variant=variant).double()
    x = torch.randn(2, hw[0] * hw[1], 32, dtype=torch.float64)
    q, k, v = heads(module, x)
    expected = merge(module, coupled_reference(q, k, v, hw, variant, module.scale))
    torch.testing.assert_close(module(x, hw=hw), expected)


def test_coupling_prefix_tokens_use_exact_attention_and_grid_ignores_them():
    hw = (4, 6)
    module = build("coupling", dim=32, num_heads=4).double()
    x = torch.randn(1, 2 + 24, 32, dtype=torch.float64)
    q, k, v = heads(module, x)
    out = module(x, hw=hw)
    grid = coupled_reference(q[..., 2:, :], k[..., 2:, :], v[..., 2:, :], hw, "concat", module.scale)
    prefix = exact_softmax_attention(q[..., :2, :], k, v)
    torch.testing.assert_close(out, merge(module, torch.cat([prefix, grid], dim=-2)))


# ---------------------------------------------------------------- nystrom


def test_newton_pinv_converges_to_the_pseudo_inverse():
    a = torch.softmax(torch.randn(3, 16, 16, dtype=torch.float64) * 2, dim=-1)
    exact = torch.linalg.pinv(a)
    errors = [relative_error(newton_pinv(a, iterations), exact) for iterations in (2, 6, 12, 25)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8


def test_newton_pinv_initialisation_is_per_matrix():
    # A matrix scaled by 1000 in the same batch must not change the other's result (the reference's bug).
    a = torch.softmax(torch.randn(2, 8, 8, dtype=torch.float64), dim=-1)
    alone = newton_pinv(a[:1], 6)
    scaled = a.clone()
    scaled[1] *= 1000
    torch.testing.assert_close(newton_pinv(scaled, 6)[:1], alone)


def test_segment_means_without_padding():
    t = torch.randn(1, 1, 10, 3)
    means = segment_means(t, 4)  # segments of 3, 2, 3, 2 tokens: floor(i * 4 / 10)
    expected = torch.stack([t[0, 0, 0:3].mean(0), t[0, 0, 3:5].mean(0), t[0, 0, 5:8].mean(0), t[0, 0, 8:10].mean(0)])
    torch.testing.assert_close(means[0, 0], expected)
    constant = torch.full((1, 1, 197, 2), 5.0)  # padding zeros would pull these means below 5
    torch.testing.assert_close(segment_means(constant, 64), torch.full((1, 1, 64, 2), 5.0))


def test_nystrom_approaches_softmax_attention_as_landmarks_approach_n():
    hw = (6, 8)
    x = torch.randn(2, 48, 64, dtype=torch.float64)
    errors = []
    for landmarks in (2, 8, 24, 48):
        module = build("nystrom", num_landmarks=landmarks, conv_kernel=None, pinv_iterations=30, prefix=0).double()
        q, k, v = heads(module, x)
        errors.append(relative_error(module(x, hw=hw), merge(module, exact_softmax_attention(q, k, v))))
    assert errors[-1] < 1e-6, errors  # m = N: every token is a landmark, the result is exact
    assert errors[0] > errors[-1] and errors[1] > errors[-1], errors


def test_nystrom_conv_residual_is_added_in_self_attention():
    hw = (4, 4)
    x = torch.randn(1, 16, 32)
    with_conv = build("nystrom", dim=32, num_heads=2, prefix=0)
    without = build("nystrom", dim=32, num_heads=2, prefix=0, conv_kernel=None)
    without.load_state_dict(with_conv.state_dict(), strict=False)
    torch.nn.init.constant_(with_conv.residual_conv.weight, 0.0)
    torch.testing.assert_close(with_conv(x, hw=hw), without(x, hw=hw))
    torch.nn.init.constant_(with_conv.residual_conv.weight, 1.0)
    assert not torch.allclose(with_conv(x, hw=hw), without(x, hw=hw))


# ---------------------------------------------------------------- performer


def test_performer_error_falls_as_feature_count_grows():
    x = torch.randn(2, 64, 32, dtype=torch.float64) * 0.5
    mean_errors = []
    for features in (4, 32, 256, 2048):
        errors = []
        for seed in range(4):
            module = build("performer", dim=32, num_heads=2, prefix=0, num_features=features, feature_seed=seed).double()
            q, k, v = heads(module, x)
            errors.append(relative_error(module(x, hw=(8, 8)), merge(module, exact_softmax_attention(q, k, v))))
        mean_errors.append(sum(errors) / len(errors))
    assert all(later < earlier for earlier, later in zip(mean_errors, mean_errors[1:])), mean_errors
    assert mean_errors[-1] < 0.05, mean_errors


def test_performer_features_are_orthogonal_blocks():
    module = build("performer", dim=64, num_heads=4, num_features=32)  # head size 16: two 16-row blocks
    w = module.projection.double()
    directions = w / w.norm(dim=1, keepdim=True)
    for block in (directions[:16], directions[16:]):
        torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)


def test_performer_redraws_only_in_training():
    module = build("performer", dim=32, num_heads=2, prefix=0, redraw_interval=2)
    x = torch.randn(1, 16, 32)
    first = module.projection.clone()
    for _ in range(5):
        module(x, hw=(4, 4))  # eval mode
    torch.testing.assert_close(module.projection, first)
    module.train()
    module(x, hw=(4, 4))
    module(x, hw=(4, 4))
    torch.testing.assert_close(module.projection, first)  # two calls: not yet
    module(x, hw=(4, 4))
    assert not torch.allclose(module.projection, first)  # the third call redraws
    assert int(module.redraws) == 1

    frozen = build("performer", dim=32, num_heads=2, prefix=0, redraw_interval=None).train()
    before = frozen.projection.clone()
    for _ in range(5):
        frozen(x, hw=(4, 4))
    torch.testing.assert_close(frozen.projection, before)


def test_performer_draws_are_reproducible_from_the_seed():
    a = build("performer", dim=32, num_heads=2, feature_seed=3)
    torch.manual_seed(123)  # the global RNG must not matter (DDP ranks, resumed runs)
    b = build("performer", dim=32, num_heads=2, feature_seed=3)
    torch.testing.assert_close(a.projection, b.projection)
    a.redraw_features()
    b.redraw_features()
    torch.testing.assert_close(a.projection, b.projection)


# ---------------------------------------------------------------- care


def test_care_equals_normalised_linear_attention_formula():
    module = build("care", dim=32, num_heads=2, prefix=1).double()
    x = torch.randn(2, 1 + 4 * 5, 32, dtype=torch.float64)
    q, k, v = heads(module, x)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    n = x.shape[1]
    expected = torch.empty_like(v)
    for i in range(n):  # token by token, as written in the paper
        kv = sum(torch.einsum("bhd,bhe->bhde", phi_k[:, :, j], v[:, :, j]) for j in range(n)) / n
        z = 1.0 / ((phi_q[:, :, i] * phi_k.mean(dim=2)).sum(-1) + 1e-6)
        expected[:, :, i] = torch.einsum("bhd,bhde->bhe", phi_q[:, :, i], kv) * z[..., None]
    torch.testing.assert_close(module(x, hw=(4, 5)), merge(module, expected))


def test_care_block_form_uses_the_input_as_values_without_projection():
    module = build("care", dim=32, num_heads=2, prefix=0, value_projection=False, output_projection=False).double()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    q = (x @ module.qkv.weight[:32].T + module.qkv.bias[:32]).view(1, 12, 2, 16).transpose(1, 2)
    k = (x @ module.qkv.weight[32:].T + module.qkv.bias[32:]).view(1, 12, 2, 16).transpose(1, 2)
    v = x.view(1, 12, 2, 16).transpose(1, 2)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    out = (phi_q @ (phi_k.transpose(-2, -1) @ v / 12)) / (phi_q @ phi_k.mean(2).unsqueeze(-1) + 1e-6)
    torch.testing.assert_close(module(x, hw=(3, 4)), out.transpose(1, 2).flatten(2))


def test_care_gradients_match_numerical_derivatives():
    """CARE's attend works in place on its intermediate tensors: the gradients must still be exact."""
    module = build("care", dim=8, num_heads=2, prefix=0).double()
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: module.attend(q, k, v, (2, 3), (2, 3)), (q, k, v))


# ---------------------------------------------------------------- linformer


def linformer_formula(module, x, context=None):
    """softmax(q (E k)^T / sqrt(d)) (F v) with k, v projected token by token, prefix tokens kept."""
    q, _, _ = heads(module, x)
    _, k, v = heads(module, x if context is None else context)
    prefix = k.shape[2] - module.key_projection.shape[1]
    k = torch.cat([k[:, :, :prefix], module.key_projection @ k[:, :, prefix:]], dim=2)
    v = torch.cat([v[:, :, :prefix], module.value_projection @ v[:, :, prefix:]], dim=2)
    return merge(module, exact_softmax_attention(q, k, v))


@pytest.mark.parametrize("prefix", [0, 1])
def test_linformer_compressing_before_projecting_equals_the_formula(prefix):
    """lattn compresses x before the key/value projection; the paper projects first. Equal, bias included,
    in self- and cross-attention, and the RoPE path (which projects first) agrees without rotation."""
    module = build("linformer", dim=32, num_heads=2, hw=(3, 4), prefix=prefix).double()
    torch.nn.init.normal_(module.qkv.bias)
    x = torch.randn(2, prefix + 12, 32, dtype=torch.float64)
    context = torch.randn(2, prefix + 12, 32, dtype=torch.float64)
    torch.testing.assert_close(module(x, hw=(3, 4)), linformer_formula(module, x))
    torch.testing.assert_close(module(x, hw=(3, 4), context=context, context_hw=(3, 4)),
                               linformer_formula(module, x, context))
    projected_first = QKVAttention.mix(module, x, (3, 4), None, None)  # project, then attend's compression
    torch.testing.assert_close(module(x, hw=(3, 4)), projected_first)


def test_linformer_gradients_match_numerical_derivatives():
    module = build("linformer", dim=8, num_heads=2, hw=(2, 3), prefix=1, k=4).double()
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    context = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *weights: module(x, hw=(2, 3)), (x, *module.parameters()))
    assert torch.autograd.gradcheck(lambda x, context, *weights: module(x, hw=(2, 3), context=context,
                                                                        context_hw=(2, 3)),
                                    (x, context, *module.parameters()))


@pytest.mark.parametrize("autocast", [False, True])
def test_linformer_backward_through_a_retained_graph_gives_the_same_gradients(autocast):
    """The first backward pass frees the compressed key and value rows once used; a second one through
    the retained graph recomputes them (under autocast as the forward pass ran) and must agree."""
    module = build("linformer", dim=32, num_heads=2, hw=(4, 5), prefix=1)
    torch.nn.init.normal_(module.qkv.bias)
    x = torch.randn(2, 21, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = module(x, hw=(4, 5)).float().square().sum()
    inputs = [x, *module.parameters()]
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs)
    for (name, _), got, want in zip([("x", x), *module.named_parameters()], second, first):
        torch.testing.assert_close(got, want, msg=name)


def test_linformer_trains_under_bf16_autocast_with_fp32_gradients_close_to_fp32():
    module = build("linformer", dim=32, num_heads=2, hw=(4, 5), prefix=1)
    x = torch.randn(2, 21, 32, requires_grad=True)
    expected = torch.autograd.grad(module(x, hw=(4, 5)).square().sum(), [x, *module.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, hw=(4, 5))
    grads = torch.autograd.grad(out.float().square().sum(), [x, *module.parameters()])
    for (name, _), got, want in zip([("x", x), *module.named_parameters()], grads, expected):
        assert got.dtype == torch.float32, name
        assert (got - want).norm() <= 0.05 * want.norm(), name


# ---------------------------------------------------------------- fnet


def test_fnet_1d_equals_numpy_fft():
    module = build("fnet", dim=16, mode="1d")
    x = torch.randn(2, 1 + 3 * 5, 16, dtype=torch.float64)
    expected = np.fft.fft(np.fft.fft(x.numpy(), axis=-1), axis=-2).real  # FFT_seq(FFT_hidden(x))
    np.testing.assert_allclose(module(x, hw=(3, 5)).numpy(), expected, rtol=1e-10, atol=1e-10)


def test_fnet_2d_equals_numpy_fft_over_grid_and_hidden():
    module = build("fnet", dim=8, mode="2d")
    x = torch.randn(2, 2 + 3 * 5, 8, dtype=torch.float64)
    out = module(x, hw=(3, 5)).numpy()
    grid = x[:, 2:].numpy().reshape(2, 3, 5, 8)
    expected_grid = np.fft.fftn(grid, axes=(1, 2, 3)).real.reshape(2, 15, 8)
    np.testing.assert_allclose(out[:, 2:], expected_grid, rtol=1e-10, atol=1e-10)
    # prefix tokens receive the 1D transform's first row: the zero frequency of the whole sequence
    first_row = np.fft.fft(np.fft.fft(x.numpy(), axis=-1), axis=-2).real[:, :1]
    np.testing.assert_allclose(out[:, :2], np.repeat(first_row, 2, axis=1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["1d", "2d"])
@pytest.mark.parametrize("norm", ["backward", "ortho", "forward"])
def test_fnet_gradients_are_the_transform_of_the_gradient_and_exact(mode, norm):
    """FNet's backward pass is its own transform (the map is self-adjoint): checked against numerical
    derivatives, on both routes of the 1D transform (full spectrum; half spectrum for long inputs)."""
    module = build("fnet", dim=6, mode=mode, fft_norm=norm)
    x = torch.randn(1, 1 + 3 * 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: module(x, hw=(3, 4)), (x,))
    assert torch.autograd.gradgradcheck(lambda x: module(x, hw=(3, 4)), (x,))


def test_fnet_half_spectrum_route_matches_the_full_transform_and_its_gradient(monkeypatch):
    x = torch.randn(2, 37, 10, dtype=torch.float64, requires_grad=True)  # odd N, even C
    grad = torch.randn(2, 37, 10, dtype=torch.float64)
    full = torch.fft.fft2(x, norm="ortho").real
    (expected_grad,) = torch.autograd.grad(full, x, grad)
    monkeypatch.setattr(fnet, "REAL_INPUT_MIN_ELEMENTS", 1)  # every input takes the half-spectrum route
    out = fnet.RealPartOfFFT.apply(x, (-2, -1), "ortho")
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], expected_grad)


# ---------------------------------------------------------------- softmax


def test_softmax_fused_and_materialised_agree_with_the_formula():
    fused = build("softmax", dim=32, num_heads=2).double()
    materialised = build("softmax", dim=32, num_heads=2, fused=False).double()
    materialised.load_state_dict(fused.state_dict())
    x = torch.randn(2, 1 + 12, 32, dtype=torch.float64)
    q, k, v = heads(fused, x)
    expected = merge(fused, exact_softmax_attention(q, k, v))
    torch.testing.assert_close(fused(x, hw=(3, 4)), expected)
    torch.testing.assert_close(materialised(x, hw=(3, 4)), expected)


# ---------------------------------------------------------------- rope


def test_rope_scores_depend_on_relative_offset_only():
    rope = RotaryEmbedding2D(16)
    q = torch.randn(16, dtype=torch.float64).expand(1, 1, 6 * 7, 16).float()
    k = torch.randn(16, dtype=torch.float64).expand(1, 1, 6 * 7, 16).float()
    rq, rk = rope(q, (6, 7))[0, 0].view(6, 7, 16), rope(k, (6, 7))[0, 0].view(6, 7, 16)
    score = lambda a, b: (rq[a] * rk[b]).sum()  # noqa: E731
    torch.testing.assert_close(score((1, 2), (3, 1)), score((2, 4), (4, 3)))  # same (dy, dx) = (2, -1)
    assert not torch.allclose(score((1, 2), (3, 1)), score((1, 2), (1, 3)))
    torch.testing.assert_close(rq.norm(dim=-1), q[0, 0].view(6, 7, 16).norm(dim=-1))  # a rotation


def test_rope_1d_scores_depend_on_the_index_offset_and_every_token_is_rotated():
    rope = RotaryEmbedding1D(8)
    q = torch.randn(8, dtype=torch.float64).expand(1, 1, 12, 8)
    k = torch.randn(8, dtype=torch.float64).expand(1, 1, 12, 8)
    rq, rk = rope(q)[0, 0], rope(k)[0, 0]
    torch.testing.assert_close((rq[2] * rk[7]).sum(), (rq[4] * rk[9]).sum())  # same offset 5
    assert not torch.allclose((rq[2] * rk[7]).sum(), (rq[2] * rk[8]).sum())
    torch.testing.assert_close(rq[0], q[0, 0, 0])  # index 0 (the class token's) is not rotated
    # frequencies base^(-2i/d), i = 0 .. d/2 - 1, pair (2i, 2i+1) by index * frequency
    angle = 3 * 10_000 ** (-2 / 8)
    expected = torch.tensor([q[0, 0, 0, 2] * math.cos(angle) - q[0, 0, 0, 3] * math.sin(angle),
                             q[0, 0, 0, 2] * math.sin(angle) + q[0, 0, 0, 3] * math.cos(angle)], dtype=torch.float64)
    torch.testing.assert_close(rq[3, 2:4], expected)


def test_rope_leaves_prefix_tokens_unrotated():
    rope = RotaryEmbedding2D(8)
    t = torch.randn(2, 3, 2 + 12, 8)
    out = rope(t, (3, 4))
    torch.testing.assert_close(out[..., :2, :], t[..., :2, :])
    torch.testing.assert_close(out[..., 2, :], t[..., 2, :])  # grid position (0, 0): angle zero
    assert not torch.allclose(out[..., 3:, :], t[..., 3:, :])
