"""lattn's paper models against their authors' released models, in float64.

The references are not installable (the X-formers' scripts in pranavphoenix/VisionXformer, Couplformer's
wer010/Couplformer), so each test writes the reference's structure down as read from its code (which
layers, in which order, with which biases, normalisations and position embeddings; no code copied) and
uses the real PyPI attention layers where the reference itself uses them (performer-pytorch, linformer).
Weights are copied parameter by parameter; outputs and input gradients must agree to round-off, and the
trainable parameter counts must be the reference's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lattn_app.backbones import create_backbone
from lattn_app.backbones.couplformer import couplformer, couplformer_hierarchical

from .helpers import TIGHT

performer_pytorch = pytest.importorskip("performer_pytorch")
linformer = pytest.importorskip("linformer")

pytestmark = pytest.mark.usefixtures("one_thread")


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def assert_same_function(ours: nn.Module, reference: nn.Module, images: torch.Tensor) -> None:
    a, b = images.clone().requires_grad_(), images.clone().requires_grad_()
    out_ours, out_ref = ours(a), reference(b)
    torch.testing.assert_close(out_ours, out_ref, **TIGHT)
    grad = torch.randn_like(out_ref)
    (out_ours * grad).sum().backward()
    (out_ref * grad).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **TIGHT)


@torch.no_grad()
def perturb_(module: nn.Module) -> nn.Module:
    """Move every parameter off its initial value (LayerNorms start at 1 and 0, which would hide a swap)."""
    for parameter in module.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.1)
    return module


def load_(target: nn.Module, mapping: dict[str, torch.Tensor]) -> None:
    """Copy each reference tensor into lattn's parameter of that name; every lattn parameter must be named."""
    state = dict(target.named_parameters())
    assert set(mapping) == set(state), (set(state) ^ set(mapping))
    with torch.no_grad():
        for name, tensor in mapping.items():
            assert state[name].shape == tensor.shape, name
            state[name].copy_(tensor)


# ---------------------------------------------------------------------------------------- X-formers' ViX

class ReferenceViX(nn.Module):
    """The X-formers' CIFAR ViX (Models/ViP.py, ViL.py; Hybrid*.py for the stem) for patch size 1: a linear
    patch embedding (or three biased 3x3 convs), a class token, a learned position embedding over all
    tokens, pre-norm layers x + attn(LN(x)), x + FF(LN(x)) with FF = Linear-GELU-Linear, then the class
    token through LN and a linear classifier. PyTorch's LayerNorm epsilon (1e-5)."""

    def __init__(self, attention, dim, depth, mlp_dim, num_classes, tokens, hybrid):
        super().__init__()
        self.hybrid = hybrid
        if hybrid:
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1),
                                      nn.Conv2d(64, dim, 3, padding=1))
        else:
            self.stem = nn.Linear(3, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), attention(), nn.LayerNorm(dim),
                           nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))])
            for _ in range(depth)
        )
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, images):
        if self.hybrid:
            x = self.stem(images).flatten(2).transpose(1, 2)
        else:
            x = self.stem(images.flatten(2).transpose(1, 2))  # patch 1: one pixel's channels per token
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for norm1, attention, norm2, feed_forward in self.layers:
            x = attention(norm1(x)) + x
            x = feed_forward(norm2(x)) + x
        return self.head(x[:, 0])


def vix_mapping(reference: ReferenceViX, attention_mapping) -> dict[str, torch.Tensor]:
    mapping = {"pos_embed": reference.pos_embedding, "cls_token": reference.cls_token,
               "norm.weight": reference.head[0].weight, "norm.bias": reference.head[0].bias,
               "head.weight": reference.head[1].weight, "head.bias": reference.head[1].bias}
    if reference.hybrid:
        for i in range(3):
            mapping[f"patch_embed.proj.{i}.weight"] = reference.stem[i].weight
            mapping[f"patch_embed.proj.{i}.bias"] = reference.stem[i].bias
    else:
        mapping["patch_embed.proj.weight"] = reference.stem.weight[:, :, None, None]
        mapping["patch_embed.proj.bias"] = reference.stem.bias
    for i, (norm1, attention, norm2, feed_forward) in enumerate(reference.layers):
        block = f"blocks.{i}."
        mapping.update({block + "norm1.weight": norm1.weight, block + "norm1.bias": norm1.bias,
                        block + "norm2.weight": norm2.weight, block + "norm2.bias": norm2.bias,
                        block + "mlp.fc1.weight": feed_forward[0].weight, block + "mlp.fc1.bias": feed_forward[0].bias,
                        block + "mlp.fc2.weight": feed_forward[2].weight, block + "mlp.fc2.bias": feed_forward[2].bias})
        mapping.update({block + "attn." + name: tensor for name, tensor in attention_mapping(attention).items()})
    return mapping


def performer_mapping(attention) -> dict[str, torch.Tensor]:
    return {"qkv.weight": torch.cat([attention.to_q.weight, attention.to_k.weight, attention.to_v.weight]),
            "qkv.bias": torch.cat([attention.to_q.bias, attention.to_k.bias, attention.to_v.bias]),
            "proj.weight": attention.to_out.weight, "proj.bias": attention.to_out.bias}


def linformer_mapping(attention) -> dict[str, torch.Tensor]:  # one kv head, values = keys (their ViL)
    return {"qkv.weight": torch.cat([attention.to_q.weight, attention.to_k.weight]),
            "key_projection": attention.proj_k.T,
            "proj.weight": attention.to_out.weight, "proj.bias": attention.to_out.bias}


SIDE, DIM, HEADS, DEPTH, MLP = 4, 32, 2, 2, 64  # small: 16 tokens + a class token


def lattn_vix(attention, options, stem):
    return create_backbone("vit", img_size=SIDE, patch_size=1, num_classes=5, embed_dim=DIM, depth=DEPTH,
                           num_heads=HEADS, mlp_ratio=MLP / DIM, attention=attention, attention_options=options,
                           stem=stem, norm_eps=1e-5).double().eval()


@pytest.mark.parametrize("hybrid", [False, True], ids=["ViP", "HybridViP"])
def test_vip_and_hybrid_vip_equal_the_x_formers_models(hybrid):
    torch.manual_seed(0)

    def attention():
        return performer_pytorch.SelfAttention(DIM, heads=HEADS, dim_head=DIM // HEADS, qkv_bias=True,
                                               attn_out_bias=True)

    reference = perturb_(ReferenceViX(attention, DIM, DEPTH, MLP, 5, SIDE * SIDE, hybrid).double().eval())
    ours = lattn_vix("performer", {"kernel_epsilon": 1e-4, "redraw_interval": None},
                     "xformers" if hybrid else "linear")
    load_(ours, vix_mapping(reference, performer_mapping))
    with torch.no_grad():  # the random features are buffers, one independent draw per layer in both
        for block, (_, attention_layer, _, _) in zip(ours.blocks, reference.layers):
            block.attn.projection.copy_(attention_layer.fast_attention.projection_matrix)
    assert trainable(ours) == trainable(reference)
    assert_same_function(ours, reference, torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64))


def test_vil_equals_the_x_formers_model():
    torch.manual_seed(0)

    def attention():
        return linformer.LinformerSelfAttention(DIM, SIDE * SIDE + 1, k=8, heads=HEADS, dim_head=DIM // HEADS,
                                                one_kv_head=True, share_kv=True)

    reference = perturb_(ReferenceViX(attention, DIM, DEPTH, MLP, 5, SIDE * SIDE, hybrid=False).double().eval())
    ours = lattn_vix("linformer", {"k": 8, "sharing": "key-value", "one_kv_head": True, "share_kv": True,
                                   "project_prefix": True, "qkv_bias": False}, "linear")
    load_(ours, vix_mapping(reference, linformer_mapping))
    assert trainable(ours) == trainable(reference)
    assert_same_function(ours, reference, torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64))


def test_stems_parameter_counts_at_the_cifar_width():
    reference_stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1),
                                   nn.Conv2d(64, 128, 3, padding=1))
    ours = create_backbone("vix_cifar", stem="xformers").patch_embed
    lattn_own = create_backbone("vix_cifar", stem="conv").patch_embed
    assert trainable(ours) == trainable(reference_stem) == 93_248
    assert trainable(lattn_own) == 93_344  # BatchNorm's affine parameters, no conv biases


# ------------------------------------------------------------------------------------------- Couplformer

def coupling_reference(q, k, v, height, width, merge):
    """The reference's coupling attention on per-head (B, h, N, d) tensors, as its formulas read: row map
    A = softmax(s Q_r K_r^T) over H rows, column map B over W columns, s = d^-1/4, each row (column) the
    concatenated channels of its tokens ("concat") or their maximum over the channels ("pooling");
    out[i, j] = sum_{k, l} A[i, k] B[j, l] v[k, l]."""
    q, k, v = (t.unflatten(-2, (height, width)) for t in (q, k, v))  # (B, h, H, W, d)
    scale = q.shape[-1] ** -0.25
    if merge == "pooling":
        rows = torch.einsum("bhiw,bhkw->bhik", q.amax(-1), k.amax(-1))
        cols = torch.einsum("bhxj,bhxl->bhjl", q.amax(-1), k.amax(-1))
    else:
        rows = torch.einsum("bhiwc,bhkwc->bhik", q, k)
        cols = torch.einsum("bhxjc,bhxlc->bhjl", q, k)
    a, b = torch.softmax(rows * scale, -1), torch.softmax(cols * scale, -1)
    return torch.einsum("bhik,bhjl,bhklc->bhijc", a, b, v).flatten(2, 3)


class ReferenceCouplingAttention(nn.Module):
    def __init__(self, dim, heads, grid, qkv_bias, merge):
        super().__init__()
        self.heads, self.grid, self.merge = heads, grid, merge
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = coupling_reference(q, k, v, *self.grid, self.merge)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).flatten(2))


def cct_sine(tokens, dim):
    """CCT's fixed position table: sin / cos of p / 10000^(2 floor(i/2) / C) in even / odd channels."""
    table = torch.tensor([[p / 10000 ** (2 * (i // 2) / dim) for i in range(dim)] for p in range(tokens)],
                         dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = table[:, 0::2].sin(), table[:, 1::2].cos()
    return table[None]


class ReferenceKCT(nn.Module):
    """KCT (src/kct.py with src/utils/transformers_kronecker.py): one 4x4 stride-4 conv with bias, CCT's
    sine positions (not trained), CCT layers (x + attn(LN(x)); x = LN(x); x + MLP(x)), q/k/v without bias,
    final LN, sequence pooling (softmax over tokens of a linear score), linear classifier."""

    def __init__(self, dim, depth, heads, mlp_ratio, num_classes, img_size):
        super().__init__()
        grid = (img_size // 4, img_size // 4)
        self.tokenizer = nn.Conv2d(3, dim, 4, stride=4)
        self.register_buffer("positions", cct_sine(grid[0] * grid[1], dim))
        hidden = int(dim * mlp_ratio)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"pre_norm": nn.LayerNorm(dim),
                           "attn": ReferenceCouplingAttention(dim, heads, grid, qkv_bias=False, merge="concat"),
                           "linear1": nn.Linear(dim, hidden), "norm1": nn.LayerNorm(dim),
                           "linear2": nn.Linear(hidden, dim)})
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.attention_pool = nn.Linear(dim, 1)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, images):
        x = self.tokenizer(images).flatten(2).transpose(1, 2) + self.positions
        for layer in self.layers:
            x = x + layer["attn"](layer["pre_norm"](x))
            x = layer["norm1"](x)
            x = x + layer["linear2"](F.gelu(layer["linear1"](x)))
        x = self.norm(x)
        weights = torch.softmax(self.attention_pool(x), dim=1)
        return self.fc((weights.transpose(1, 2) @ x).squeeze(1))


def kct_mapping(reference: ReferenceKCT) -> dict[str, torch.Tensor]:
    mapping = {"tokenizer.proj.weight": reference.tokenizer.weight, "tokenizer.proj.bias": reference.tokenizer.bias,
               "norm.weight": reference.norm.weight, "norm.bias": reference.norm.bias,
               "pool.attention.weight": reference.attention_pool.weight,
               "pool.attention.bias": reference.attention_pool.bias,
               "head.weight": reference.fc.weight, "head.bias": reference.fc.bias}
    for i, layer in enumerate(reference.layers):
        for ours, theirs in [("norm1", "pre_norm"), ("norm2", "norm1"), ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"),
                             ("attn.proj", "attn.proj")]:
            module = layer[theirs] if "." not in theirs else layer["attn"].proj
            mapping[f"blocks.{i}.{ours}.weight"] = module.weight
            mapping[f"blocks.{i}.{ours}.bias"] = module.bias
        mapping[f"blocks.{i}.attn.qkv.weight"] = layer["attn"].qkv.weight
    return mapping


def test_flat_couplformer_equals_the_reference_kct():
    torch.manual_seed(0)
    reference = perturb_(ReferenceKCT(dim=16, depth=2, heads=4, mlp_ratio=2.0, num_classes=7, img_size=16).double().eval())
    ours = couplformer(depth=2, embed_dim=16, num_heads=4, mlp_ratio=2.0, num_classes=7, img_size=16).double().eval()
    load_(ours, kct_mapping(reference))
    assert_same_function(ours, reference, torch.randn(2, 3, 16, 16, dtype=torch.float64))


def test_flat_preset_has_the_reference_s_trainable_parameters():
    """The reference README's CIFAR-100 model (6 layers, width 128, 64 heads, MLP ratio 3): 1,009,509."""
    reference = ReferenceKCT(dim=128, depth=6, heads=64, mlp_ratio=3.0, num_classes=100, img_size=32)
    ours = couplformer(preset="small", num_classes=100, img_size=32)
    assert trainable(ours) == trainable(reference) == 1_009_509


class ReferenceCouplformerHierarchical(nn.Module):
    """The Couplformer of src/vic.py as its vic_* presets build it: 4x4 patch conv + LN, CCT's sine positions
    over the patches, stages of pre-norm blocks (q/k/v with bias, channel_merge "pooling") followed by
    Swin's patch merging (LN over [x(0,0), x(1,0), x(0,1), x(1,1)], then a linear map 4C -> 2C without bias),
    final LN, sequence pooling (scored at the final width), classifier."""

    def __init__(self, dim, depths, heads, mlp_ratio, num_classes, img_size):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.patch_norm = nn.LayerNorm(dim)
        side = img_size // 4
        self.register_buffer("positions", cct_sine(side * side, dim))
        self.stages = nn.ModuleList()
        for i, (depth, head_count) in enumerate(zip(depths, heads)):
            width, grid = dim * 2**i, (side // 2**i, side // 2**i)
            blocks = nn.ModuleList(
                nn.ModuleDict({"norm1": nn.LayerNorm(width),
                               "attn": ReferenceCouplingAttention(width, head_count, grid, True, "pooling"),
                               "norm2": nn.LayerNorm(width), "fc1": nn.Linear(width, int(width * mlp_ratio)),
                               "fc2": nn.Linear(int(width * mlp_ratio), width)})
                for _ in range(depth)
            )
            merge = None
            if i < len(depths) - 1:
                merge = nn.ModuleDict({"norm": nn.LayerNorm(4 * width), "reduction": nn.Linear(4 * width, 2 * width, bias=False)})
            self.stages.append(nn.ModuleDict({"blocks": blocks, **({"merge": merge} if merge else {})}))
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))
        self.pool = nn.Linear(dim * 2 ** (len(depths) - 1), 1)
        self.head = nn.Linear(dim * 2 ** (len(depths) - 1), num_classes)

    def forward(self, images):
        x = self.patch_norm(self.patch(images).flatten(2).transpose(1, 2)) + self.positions
        side = images.shape[-1] // 4
        for stage in self.stages:
            for block in stage["blocks"]:
                x = x + block["attn"](block["norm1"](x))
                x = x + block["fc2"](F.gelu(block["fc1"](block["norm2"](x))))
            if "merge" in stage:
                grid = x.unflatten(1, (side, side))
                x = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
                x = stage["merge"]["reduction"](stage["merge"]["norm"](x.flatten(1, 2)))
                side //= 2
        x = self.norm(x)
        return self.head((torch.softmax(self.pool(x), dim=1).transpose(1, 2) @ x).squeeze(1))


def hierarchical_mapping(reference) -> dict[str, torch.Tensor]:
    mapping = {"patch_embed.proj.weight": reference.patch.weight, "patch_embed.proj.bias": reference.patch.bias,
               "patch_embed.norm.weight": reference.patch_norm.weight, "patch_embed.norm.bias": reference.patch_norm.bias,
               "norm.weight": reference.norm.weight, "norm.bias": reference.norm.bias,
               "pool.attention.weight": reference.pool.weight, "pool.attention.bias": reference.pool.bias,
               "head.weight": reference.head.weight, "head.bias": reference.head.bias}
    for i, stage in enumerate(reference.stages):
        for j, block in enumerate(stage["blocks"]):
            prefix = f"stages.{i}.blocks.{j}."
            for ours, module in [("norm1", block["norm1"]), ("norm2", block["norm2"]), ("mlp.fc1", block["fc1"]),
                                 ("mlp.fc2", block["fc2"]), ("attn.qkv", block["attn"].qkv), ("attn.proj", block["attn"].proj)]:
                mapping[prefix + ours + ".weight"] = module.weight
                mapping[prefix + ours + ".bias"] = module.bias
        if "merge" in stage:  # the reference merges at the end of a stage, lattn at the start of the next
            mapping[f"stages.{i + 1}.downsample.norm.weight"] = stage["merge"]["norm"].weight
            mapping[f"stages.{i + 1}.downsample.norm.bias"] = stage["merge"]["norm"].bias
            mapping[f"stages.{i + 1}.downsample.reduction.weight"] = stage["merge"]["reduction"].weight
    return mapping


def test_hierarchical_couplformer_equals_the_reference():
    torch.manual_seed(0)
    options = dict(embed_dim=8, depths=(1, 1), num_heads=(4, 8), mlp_ratio=2.0, num_classes=5, img_size=16)
    reference = perturb_(ReferenceCouplformerHierarchical(8, (1, 1), (4, 8), 2.0, 5, 16).double().eval())
    ours = couplformer_hierarchical(**options).double().eval()
    assert ours.stages[0].blocks[0].attn.variant == "pooling"  # the reference presets' channel_merge
    load_(ours, hierarchical_mapping(reference))
    assert_same_function(ours, reference, torch.randn(2, 3, 16, 16, dtype=torch.float64))
