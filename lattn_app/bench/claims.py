"""`lattn bench claims`: the papers' memory claims (docs/methods.md#memory-claims) as ratios measured on this machine.

1. Couplformer: 42% less training memory than the regular Transformer of the same size at 224 on
   ImageNet shapes. Measured: the Swin-like Couplformer with coupling attention against the same network
   with the N x N map materialised (softmax, ``fused=False``), 1000 classes.
2. X-formers: up to 7x less GPU memory than ViT in the CIFAR configuration (32 x 32, patch 1, dim 128,
   depth 4, 4 heads). Measured: ``vix_cifar`` with each X-former against it with materialised softmax.
3. Efficient attention in the stereo network: against materialised softmax in the same PSMNet-style
   network (the attention layers and the pyramid backbone's attention both swapped); the whole training
   step and the attention layers alone. The paper states no stereo memory figure.
4. Efficient Attention on COCO: a ResNet-50 FPN Mask R-CNN with 5 efficient attention modules fits where
   5 non-local blocks ran out of memory (the paper's Table). Measured: lattn's ``resnet50`` Mask R-CNN
   (FrozenBatchNorm, layer2-4 trained, as torchvision's) with 5 modules placed as the non-local paper's
   5 blocks, efficient against materialised softmax (the non-local block's N x N map) and against fused
   softmax through ``scaled_dot_product_attention`` (PyTorch's CPU flash kernel needs equal key and value
   widths, so with keys C/2 and values C it computes the N x N map as well), at 800 x 1333, batch 1.
5. EA-PSMNet against PSMNet (the paper: Scene Flow EPE 0.48 against 1.09, no memory figure): PSMNet's own
   network without and with the module after its feature extractor's layer4 (efficient, and the non-local
   module with its N x N map materialised), at the Scene Flow crop of 256 x 512, max disparity 192.

Training memory = weights + gradients + the peak extra memory of one training step (SGD without
momentum, so no optimiser state); batch 1 by default. A network that runs out of memory under the limit
is a result too: the claim then holds at least by the ratio to the limit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import report
from .backbone import build_network, training_step, training_step_peak
from .command_line import add_machine_options, benchmark_parser, results_document, set_up_machine
from .measure import run_capped, tensor_bytes

# Image sizes of the measurements: the papers' settings, and smaller ones for --quick.
FULL_SETTINGS = {"couplformer_size": 224, "stereo_crop": (256, 512), "coco_image": (800, 1333), "psmnet_batch": 1}
# PSMNet's pyramid pooling needs two values per channel: a 128 x 256 crop takes a batch of 2.
QUICK_SETTINGS = {"couplformer_size": 112, "stereo_crop": (128, 256), "coco_image": (256, 416), "psmnet_batch": 2}
REGULAR = ("softmax", {"fused": False})  # the papers' "regular Transformer": the N x N map materialised
XFORMERS = ("performer", "linformer", "nystrom", "fnet", "mixer")


def training_memory(model: nn.Module, step: Callable[[], object], device: torch.device) -> int:
    """Weights + the peak memory of one training step, its gradients included."""
    model.train()
    return tensor_bytes(model.parameters()) + training_step_peak(model, step, device)


def classifier_memory(backbone: str, attention: str, options: dict[str, Any] | None, size: int, batch: int,
                      device: torch.device) -> int:
    model = build_network(backbone, attention, size, num_classes=1000, attention_options=options).to(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    return training_memory(model, lambda: training_step(model, images, labels, optimizer), device)


def stereo_memory(attention: str, options: dict[str, Any] | None, crop: tuple[int, int], batch: int,
                  device: torch.device, attention_only: bool) -> int:
    """Training memory of the stereo network (or of its attention layers alone) at a crop."""
    from ..models.stereo import StereoNet, StereoNetOptions

    network = StereoNet(attention=attention, attention_options=options,
                        backbone_options={"attention": attention, "attention_options": options},
                        options=StereoNetOptions(img_size=crop)).to(device)
    generator = torch.Generator().manual_seed(0)
    if attention_only:
        model = network.attention
        grid = (crop[0] // 4, crop[1] // 4)
        channels = network.fusion.smooth[-1].out_channels
        left, right = (torch.randn(batch, channels, *grid, generator=generator).to(device) for _ in range(2))

        def step() -> Tensor:
            model.zero_grad(set_to_none=True)
            out_left, out_right = model(left, right)
            loss = out_left.float().square().mean() + out_right.float().square().mean()
            loss.backward()
            return loss.detach()
    else:
        model = network
        left, right = (torch.randn(batch, 3, *crop, generator=generator).to(device) for _ in range(2))
        target = torch.rand(batch, *crop, generator=generator).to(device) * 100
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = sum(F.smooth_l1_loss(disparity, target) for disparity in model(left, right))
            loss.backward()
            optimizer.step()
            return loss.detach()
    return training_memory(model, step, device)


def maskrcnn_memory(attention: str, options: dict[str, Any] | None, modules: int, image: tuple[int, int],
                    batch: int, device: torch.device) -> int:
    """Training memory of the ResNet-50 FPN Mask R-CNN with `modules` attention modules, one object per image."""
    from ..models.detection import build_detector

    backbone = {"attention": attention, "attention_options": options, "attention_positions": modules,
                "num_classes": 0, "norm_layer": "frozen", "trainable_layers": 3, "img_size": image}
    model = build_detector("maskrcnn", 80, "resnet50", backbone).to(device)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(3, *image, generator=generator).to(device) for _ in range(batch)]
    height, width = image
    box = torch.tensor([[width * 0.25, height * 0.25, width * 0.75, height * 0.75]], device=device)
    mask = torch.zeros(1, height, width, dtype=torch.uint8, device=device)
    mask[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
    targets = [{"boxes": box, "labels": torch.tensor([1], device=device), "masks": mask} for _ in range(batch)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = sum(model(images, targets).values())
        loss.backward()
        optimizer.step()
        return loss.detach()
    return training_memory(model, step, device)


def psmnet_memory(attention: str | None, options: dict[str, Any] | None, crop: tuple[int, int], batch: int,
                  device: torch.device, max_disparity: int = 192) -> int:
    """Training memory of PSMNet (`attention` None) or EA-PSMNet (a mechanism) at a crop."""
    from ..models.psmnet import PSMNet
    from ..tasks.stereo import PSMNET_LOSS_WEIGHTS

    torch.manual_seed(0)
    model = PSMNet(max_disparity, attention, options, img_size=crop).to(device)
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(batch, 3, *crop, generator=generator).to(device) for _ in range(2))
    target = (torch.rand(batch, *crop, generator=generator) * (max_disparity - 1)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        outputs = model(left, right)
        loss = sum(w * F.smooth_l1_loss(out, target) for w, out in zip(PSMNET_LOSS_WEIGHTS, outputs))
        loss.backward()
        optimizer.step()
        return loss.detach()
    return training_memory(model, step, device)


def measure(what: Callable[[], int], memory_limit: int | None, device: torch.device) -> int | None:
    """Bytes, or None when the measurement ran out of memory under the limit (any other error stops the
    run: every claim needs its measurements)."""
    return run_capped(what, memory_limit, device, raise_errors=True)[0]


def _mb(value: int | None) -> str:
    return "out of memory" if value is None else f"{value / 2**20:.0f} MB"


def run_claims(device: torch.device, quick: bool, batch: int, memory_limit: int | None,
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    claims = []
    limit_text = "the limit" if memory_limit is None else f"the {memory_limit / 2**30:.1f} GiB limit"

    # 1. Couplformer vs the regular Transformer.
    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    size = settings["couplformer_size"]
    log(f"claim 1: couplformer_hierarchical at {size}x{size}, batch {batch}")
    coupled = measure(lambda: classifier_memory("couplformer_hierarchical", "coupling", None, size, batch,
                                                device), memory_limit, device)
    regular = measure(lambda: classifier_memory("couplformer_hierarchical", *REGULAR, size, batch,
                                                device), memory_limit, device)
    if coupled is not None and regular is not None:
        ours, reduction = f"{1 - coupled / regular:.0%} less", 1 - coupled / regular
    elif coupled is not None:
        ours, reduction = f"> {1 - coupled / memory_limit:.0%} less (regular out of memory at {limit_text})", None
    else:
        ours, reduction = "not measured (coupling out of memory)", None
    claims.append({
        "claim": "Couplformer: less training memory than the regular Transformer of the same size",
        "setting": f"couplformer_hierarchical (Swin-T shapes, head size 2), {size}x{size}, 1000 classes, batch {batch}",
        "paper": "42% less", "ours": ours, "value": reduction,
        "detail": f"coupling {_mb(coupled)}, regular (materialised softmax) {_mb(regular)}",
    })

    # 2. X-formers vs ViT, CIFAR configuration.
    xbatch = batch if quick else max(batch, 8)
    log(f"claim 2: vix_cifar, batch {xbatch}")
    vit = measure(lambda: classifier_memory("vix_cifar", *REGULAR, 32, xbatch, device), memory_limit, device)
    ratios, details = {}, [f"ViT (materialised softmax) {_mb(vit)}"]
    for name in XFORMERS:
        used = measure(lambda: classifier_memory("vix_cifar", name, None, 32, xbatch, device), memory_limit,
                       device)
        details.append(f"{name} {_mb(used)}")
        if used is not None and vit is not None:
            ratios[name] = vit / used
    best = max(ratios, key=ratios.get) if ratios else None
    claims.append({
        "claim": "X-formers: less memory than ViT in the CIFAR configuration",
        "setting": f"vix_cifar (32x32, patch 1, dim 128, depth 4, 4 heads), batch {xbatch}",
        "paper": "up to 7x less",
        "ours": f"up to {ratios[best]:.1f}x less ({best}); " + ", ".join(f"{n} {r:.1f}x" for n, r in ratios.items())
        if best else "not measured",
        "value": ratios.get(best) if best else None,
        "detail": "; ".join(details),
    })

    # 3. Efficient attention vs materialised softmax in the stereo network.
    crop = settings["stereo_crop"]
    log(f"claim 3: stereo network at {crop[0]}x{crop[1]}, batch {batch}")
    results = {}
    for part, attention_only in (("network", False), ("attention layers", True)):
        efficient = measure(lambda: stereo_memory("efficient", None, crop, batch, device, attention_only),
                            memory_limit, device)
        regular = measure(lambda: stereo_memory(*REGULAR, crop, batch, device, attention_only),
                          memory_limit, device)
        results[part] = (efficient, regular)
    ratio_text = []
    for part, (efficient, regular) in results.items():
        if efficient is not None and regular is not None:
            ratio_text.append(f"{part} {regular / efficient:.1f}x less")
        elif efficient is not None:
            bound = f" (more than {memory_limit / efficient:.1f}x less)" if memory_limit else ""
            ratio_text.append(f"{part}: materialised softmax out of memory at {limit_text}{bound}")
    network_ratio = results["network"]
    claims.append({
        "claim": "Efficient attention: less memory than materialised softmax in the stereo network",
        "setting": f"StereoNet (pyramid_tiny backbone, 1 self + cross attention layer at 1/4 resolution), "
                   f"crop {crop[0]}x{crop[1]}, batch {batch}",
        "paper": "no stereo figure (O(d^2) instead of O(N^2); on COCO 5-7 non-local blocks OOM where EA fits)",
        "ours": "; ".join(ratio_text) or "not measured",
        "value": network_ratio[1] / network_ratio[0] if None not in network_ratio else None,
        "detail": "; ".join(f"{part}: efficient {_mb(e)}, materialised softmax {_mb(r)}"
                            for part, (e, r) in results.items()),
    })

    # 4. Efficient attention modules vs non-local blocks in the Mask R-CNN ResNet-50 FPN.
    image = settings["coco_image"]
    log(f"claim 4: Mask R-CNN ResNet-50 FPN with 5 attention modules at {image[0]}x{image[1]}, batch {batch}")
    layouts = {"efficient": ("efficient", None, 5), "non-local": (*REGULAR, 5), "softmax via SDPA": ("softmax", None, 5),
               "no modules": ("efficient", None, 0)}
    used = {label: measure(lambda: maskrcnn_memory(name, options, modules, image, batch, device), memory_limit,
                           device)
            for label, (name, options, modules) in layouts.items()}
    efficient, nonlocal_ = used["efficient"], used["non-local"]
    if efficient is not None and nonlocal_ is not None:
        ours = f"5 non-local blocks take {nonlocal_ / efficient:.1f}x the training memory of 5 efficient modules"
    elif efficient is not None:
        ours = f"5 non-local blocks out of memory at {limit_text}; 5 efficient modules fit ({_mb(efficient)})"
    else:
        ours = "not measured (efficient out of memory)"
    claims.append({
        "claim": "Efficient Attention: 5 modules in a Mask R-CNN fit where 5 non-local blocks do not",
        "setting": f"Mask R-CNN, ResNet-50 FPN (FrozenBatchNorm, layer2-4 trained), 5 modules (3 in layer3, 2 in "
                   f"layer2), {image[0]}x{image[1]}, batch {batch}",
        "paper": "5 and 7 non-local blocks out of memory; 5 efficient modules 40.6/36.1 AP, 7: 41.2/36.7",
        "ours": ours, "value": nonlocal_ / efficient if efficient and nonlocal_ else None,
        "detail": "; ".join(f"{label} {_mb(value)}" for label, value in used.items()),
    })

    # 5. EA-PSMNet vs PSMNet (and the non-local module in the same place).
    pbatch = max(batch, settings["psmnet_batch"])
    log(f"claim 5: PSMNet and EA-PSMNet at {crop[0]}x{crop[1]}, batch {pbatch}")
    networks = {"PSMNet": (None, None), "EA-PSMNet": ("efficient", None), "non-local PSMNet": REGULAR}
    used = {label: measure(lambda: psmnet_memory(name, options, crop, pbatch, device), memory_limit, device)
            for label, (name, options) in networks.items()}
    plain, efficient, nonlocal_ = used["PSMNet"], used["EA-PSMNet"], used["non-local PSMNet"]
    parts = []
    if plain and efficient:
        parts.append(f"EA-PSMNet {efficient / plain:.2f}x PSMNet's memory")
    if efficient and nonlocal_:
        parts.append(f"a non-local module in its place {nonlocal_ / efficient:.2f}x EA-PSMNet's")
    claims.append({
        "claim": "EA-PSMNet: attention over the 1/4-resolution features at little memory cost",
        "setting": f"PSMNet (stacked hourglass, 5.22M) with the module after layer4, crop {crop[0]}x{crop[1]}, "
                   f"max disparity 192, batch {pbatch}",
        "paper": "Scene Flow EPE 0.48 against PSMNet's 1.09; no memory figure",
        "ours": "; ".join(parts) or "not measured",
        "value": efficient / plain if plain and efficient else None,
        "detail": "; ".join(f"{label} {_mb(value)}" for label, value in used.items()),
    })
    return claims


TABLE_COLUMNS = (("claim", "claim", "s"), ("paper", "paper", "s"), ("ours", "ours", "s"),
                 ("measured", "detail", "s"), ("setting", "setting", "s"))


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(
        "claims",
        "The papers' memory claims (Couplformer, X-formers, Efficient Attention in stereo and in Mask R-CNN) as ratios of "
        "training memory measured on this machine; each printed with the paper's number.",
        "smaller settings: Couplformer at 112, stereo crop 128x256 (PSMNet batch 2), Mask R-CNN at 256x416, ViX batch 1",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    # No --malloc: claims measure memory, not time (retaining freed memory only speeds up timed calls).
    add_machine_options(parser, "measurement", malloc=False)
    parser.add_argument("--output", default="bench_results/claims")
    return parser


def main(argv: Sequence[str]) -> dict[str, Any]:
    options = build_parser().parse_args(list(argv))
    machine = set_up_machine(options)
    started = time.perf_counter()
    claims = run_claims(machine.device, options.quick, options.batch_size, machine.memory_limit_bytes)
    settings = {"quick": options.quick, "batch_size": options.batch_size}
    document = results_document("claims", argv, machine, settings, started, claims)
    print()
    for claim in claims:
        print(f"{claim['claim']}\n  setting: {claim['setting']}\n  paper:   {claim['paper']}\n"
              f"  ours:    {claim['ours']}\n  memory:  {claim['detail']}\n")
    written = report.write_outputs(document, Path(options.output), "claims", TABLE_COLUMNS)
    print(report.written_line(document, written, "claims"))
    return document
