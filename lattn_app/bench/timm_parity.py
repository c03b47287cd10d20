"""`lattn bench timm`: lattn's softmax ViT against timm's, same weights, side by side (issue: the softmax twin).

Every comparison lattn reports between a linear mechanism and softmax uses lattn's own softmax ViT; if
it were slower than timm's, the linear mechanisms would look better than they are. This builds lattn's
``vit_tiny`` / ``vit_small`` with ``softmax`` attention, loads the weights of timm's
``vit_tiny_patch16_224`` / ``vit_small_patch16_224`` (random, nothing is downloaded) into it, checks the
outputs agree, and times both in alternation (:func:`~lattn_app.bench.measure.time_side_by_side`):
inference (``torch.no_grad``) and a training step (forward, cross-entropy, backward, SGD step), at
image sizes 224 and 384 and batches 1 and 16. The ratio is lattn / timm (below 1: lattn faster); peak
memory of inference is read for each as well.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from . import report
from .backbone import training_step
from .command_line import add_machine_options, benchmark_parser, results_document, set_up_machine
from .measure import call_with_peak_memory, time_side_by_side

PAIRS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}
FULL_POINTS = [(size, batch, pass_) for size in (224, 384) for batch in (1, 16) for pass_ in ("inference", "training")]
QUICK_POINTS = [(224, 1, "inference"), (224, 1, "training")]


def twin_models(name: str, size: int) -> tuple[nn.Module, nn.Module]:
    """timm's ViT and lattn's softmax ViT of the same shape at `size`, lattn's with timm's weights."""
    torch.manual_seed(0)
    theirs = timm.create_model(PAIRS[name], pretrained=False, img_size=size)
    from ..backbones import create_backbone

    ours = create_backbone(name, attention="softmax", num_classes=1000, img_size=size)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{name}: timm's {PAIRS[name]} weights do not map one to one: missing {missing}, "
                           f"unexpected {unexpected}")
    return ours, theirs


def step_function(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, training: bool):
    if not training:
        model.eval()

        def infer() -> torch.Tensor:
            with torch.no_grad():
                return model(images)
        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    return lambda: training_step(model, images, labels, optimizer)


def measure_point(name: str, size: int, batch: int, pass_: str, device: torch.device, repeats: int) -> dict[str, Any]:
    ours, theirs = (m.to(device) for m in twin_models(name, size))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    with torch.no_grad():
        difference = (ours.eval()(images) - theirs.eval()(images)).abs().max().item()
    training = pass_ == "training"
    fns = [step_function(ours, images, labels, training), step_function(theirs, images, labels, training)]
    ours_time, timm_time = time_side_by_side(fns, device, warmup=1, repeats=repeats)
    row = {"model": name, "timm": PAIRS[name], "size": size, "batch": batch, "pass": pass_,
           "lattn_seconds": ours_time.fastest, "timm_seconds": timm_time.fastest,
           "time_ratio": ours_time.fastest / timm_time.fastest, "median_ratio": ours_time.median / timm_time.median, "max_output_difference": difference}
    if not training:
        _, ours_peak = call_with_peak_memory(fns[0], device)
        _, timm_peak = call_with_peak_memory(fns[1], device)
        row.update(lattn_peak_bytes=ours_peak, timm_peak_bytes=timm_peak,
                   memory_ratio=ours_peak / timm_peak if timm_peak else None)
    return row


COLUMNS = (("model", "model", "s"), ("size", "size", "d"), ("batch", "batch", "d"), ("pass", "pass", "s"),
           ("lattn ms", "lattn_seconds", "ms"), ("timm ms", "timm_seconds", "ms"), ("lattn / timm", "time_ratio", "f3"),
           ("median lattn / timm", "median_ratio", "f3"), ("peak lattn MB", "lattn_peak_bytes", "MB"),
           ("peak timm MB", "timm_peak_bytes", "MB"), ("memory lattn / timm", "memory_ratio", "f3"),
           ("max |out diff|", "max_output_difference", "e"))


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("timm", "lattn's softmax ViT-Ti/S against timm's with the same weights: time and "
                              "memory ratios, side by side.", "224 only, batch 1, vit_tiny")
    parser.add_argument("--repeats", type=int, default=5)
    add_machine_options(parser, "point")
    parser.add_argument("--output", default="bench_results/timm")
    return parser


def main(argv: Sequence[str]) -> dict[str, Any]:
    options = build_parser().parse_args(list(argv))
    machine = set_up_machine(options)
    started = time.perf_counter()
    models = ["vit_tiny"] if options.quick else list(PAIRS)
    points = QUICK_POINTS if options.quick else FULL_POINTS
    results = []
    for name in models:
        for size, batch, pass_ in points:
            row = measure_point(name, size, batch, pass_, machine.device, options.repeats)
            print(f"{name} {size} batch {batch} {pass_}: lattn {row['lattn_seconds'] * 1e3:.1f} ms, "
                  f"timm {row['timm_seconds'] * 1e3:.1f} ms, "
                  f"ratio {row['time_ratio']:.3f}" + (f", memory ratio {row['memory_ratio']:.3f}"
                                                      if row.get("memory_ratio") else ""), flush=True)
            results.append(row)
    document = results_document("timm", argv, machine, {"quick": options.quick, "repeats": options.repeats},
                                started, results)
    written = report.write_outputs(document, Path(options.output), "timm", COLUMNS, plots=False)
    print(report.written_line(document, written))
    return document
