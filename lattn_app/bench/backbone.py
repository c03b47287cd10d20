"""`lattn bench backbone`: whole networks with each attention, next to the same network with softmax.

For each backbone x attention x image size: images/s for inference (forward without autograd) and for a
training step (forward, cross-entropy loss, backward, SGD step), the peak extra memory of each, and the
parameters and GMACs (:func:`~lattn_app.backbones.count_complexity`). The same backbone with fused
softmax attention is measured at the same sizes, and each row shows its speed and memory relative to it.
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

from ..backbones import create_backbone
from ..registry import BACKBONES
from . import report
from .command_line import add_machine_options, benchmark_parser, results_document, set_up_machine
from .measure import (
    DTYPES,
    LOST_EVENTS_NOTE,
    call_with_peak_memory,
    run_capped,
    tensor_bytes,
    time_calls,
)

DEFAULT_BACKBONES = ("vit_tiny", "pyramid_tiny")
DEFAULT_ATTENTIONS = ("efficient", "performer", "nystrom", "coupling", "care")
BASELINE = "softmax"
FULL_SIZES = (224, 512, 1024)
QUICK_SIZES = (224,)


def build_network(backbone: str, attention: str, image_size: int, num_classes: int = 1000,
                  attention_options: dict[str, Any] | None = None) -> nn.Module:
    """The backbone with `attention` in every attention layer, built for `image_size` images."""
    options: dict[str, Any] = {"attention": attention, "num_classes": num_classes}
    if attention_options:
        options["attention_options"] = attention_options
    if BACKBONES.get(backbone).accepts("img_size"):
        options["img_size"] = image_size
    return create_backbone(backbone, **options)


def training_step(model: nn.Module, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
    """One optimisation step of image classification; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def gradient_bytes(model: nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def training_step_peak(model: nn.Module, step: Callable[[], object], device: torch.device) -> int:
    """Peak memory one training step allocates, its gradients included.

    Measured after a first step (which makes the one-time allocations). Each reading starts without
    gradients, as ``zero_grad(set_to_none=True)`` leaves them: starting with the previous step's, the
    reading would net their freeing against the new ones. The gradients the step writes are a floor of
    its true peak; a lower reading lost profiler events and is taken again (:func:`call_with_peak_memory`).
    """
    step()
    _, peak = call_with_peak_memory(step, device, at_least=lambda _: gradient_bytes(model),
                                    before_each=lambda: model.zero_grad(set_to_none=True))
    return peak


def measure_network(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device, repeats: int,
                    point_seconds: float) -> dict[str, Any]:
    """Inference and training-step speed and peak memory of `model` on one batch."""
    batch = images.shape[0]
    model.eval()

    def infer() -> Tensor:
        with torch.no_grad():
            return model(images)

    def output_bytes(out: Tensor) -> int:  # a floor of the inference peak: the call allocates its output
        return tensor_bytes([out])

    logits, inference_memory = call_with_peak_memory(infer, device, at_least=output_bytes)
    inference = time_calls(infer, device, warmup=1, repeats=repeats, budget_seconds=point_seconds)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    training_memory = training_step_peak(model, lambda: training_step(model, images, labels, optimizer), device)
    lost = inference_memory < output_bytes(logits) or training_memory < gradient_bytes(model)
    training = time_calls(lambda: training_step(model, images, labels, optimizer), device, warmup=0,
                          repeats=repeats, budget_seconds=point_seconds)
    return {
        "inference_images_per_s": batch / inference.median,
        "inference_ms": inference.median * 1e3,
        "inference_peak_bytes": inference_memory,
        "training_images_per_s": batch / training.median,
        "training_ms": training.median * 1e3,
        "training_peak_bytes": training_memory,
        "repeats": inference.repeats,
        "note": LOST_EVENTS_NOTE if lost else "",
    }


def run_backbone_benchmark(backbones: Sequence[str], attentions: Sequence[str], sizes: Sequence[int],
                           batch_size: int, dtype: str, device: torch.device, repeats: int, point_seconds: float,
                           max_call_seconds: float, memory_limit: int | None,
                           progress: bool = True) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    attentions = [BASELINE] + [a for a in attentions if a != BASELINE]
    points = [(b, a, s) for b in backbones for s in sizes for a in attentions]
    records: list[dict[str, Any]] = []
    slowest: dict[tuple[str, str], tuple[int, float]] = {}  # (backbone, attention) -> (size, training s)
    for backbone, attention, size in tqdm(points, disable=not progress, unit="point", dynamic_ncols=True):
        record: dict[str, Any] = {"backbone": backbone, "attention": attention, "image_size": size,
                                  "batch_size": batch_size, "dtype": dtype, "device": str(device),
                                  "status": "ok", "note": ""}
        previous = slowest.get((backbone, attention))
        predicted = None if previous is None else previous[1] * (size / previous[0]) ** 4  # N^2, N ~ size^2
        if predicted is not None and predicted > max_call_seconds:
            record.update(status="skipped", note=f"not run: ~{predicted:.0f} s per training step predicted")
            records.append(record)
            continue

        def measure() -> None:  # its network and images are freed when it returns
            model = build_network(backbone, attention, size).to(device, DTYPES[dtype])
            cost = model.complexity(size) if hasattr(model, "complexity") else None
            generator = torch.Generator().manual_seed(0)
            images = torch.randn(batch_size, 3, size, size, generator=generator).to(device, DTYPES[dtype])
            labels = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
            record.update(measure_network(model, images, labels, device, repeats, point_seconds))
            if cost is not None:
                record.update(params_m=cost.params_m, gmacs=cost.gmacs)

        _, failure = run_capped(measure, memory_limit, device)
        if failure is None:
            slowest[(backbone, attention)] = (size, record["training_ms"] / 1e3)
        else:
            record.update(failure)
        records.append(record)

    baselines = {(r["backbone"], r["image_size"]): r for r in records if r["attention"] == BASELINE}
    for record in records:  # relative to the same backbone with softmax attention at the same size
        base = baselines.get((record["backbone"], record["image_size"]))
        if record["status"] == "ok" and base is not None and base["status"] == "ok":
            record["training_speedup_vs_softmax"] = record["training_images_per_s"] / base["training_images_per_s"]
            if LOST_EVENTS_NOTE not in (record["note"], base["note"]):  # a lost reading is not compared
                record["training_memory_vs_softmax"] = record["training_peak_bytes"] / base["training_peak_bytes"]
    return records


TABLE_COLUMNS = (
    ("backbone", "backbone", "s"), ("attention", "attention", "s"), ("size", "image_size", "d"),
    ("params M", "params_m", "f2"), ("GMACs", "gmacs", "f2"),
    ("infer img/s", "inference_images_per_s", "f2"), ("infer MB", "inference_peak_bytes", "MB"),
    ("train img/s", "training_images_per_s", "f2"), ("train MB", "training_peak_bytes", "MB"),
    ("train speed vs softmax", "training_speedup_vs_softmax", "x"),
    ("train memory vs softmax", "training_memory_vs_softmax", "x"), ("status", "status", "s"),
    ("note", "note", "s"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(
        "backbone",
        "Images/s (inference and training step), peak memory, parameters and GMACs of each backbone with each "
        "attention, next to the same backbone with fused softmax attention.",
        "vit_tiny at 224 with efficient attention only",
    )
    parser.add_argument("--backbones", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_BACKBONES)}")
    parser.add_argument("--attentions", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_ATTENTIONS)}")
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help=f"square image sides (default: {' '.join(map(str, FULL_SIZES))})")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--point-seconds", type=float, default=10.0)
    parser.add_argument("--max-call-seconds", type=float, default=60.0,
                        help="skip a point whose training step is predicted to take longer")
    add_machine_options(parser, "point")
    parser.add_argument("--output", default="bench_results/backbone")
    return parser


def main(argv: Sequence[str]) -> dict[str, Any]:
    options = build_parser().parse_args(list(argv))
    machine = set_up_machine(options)
    backbones = options.backbones or (["vit_tiny"] if options.quick else list(DEFAULT_BACKBONES))
    attentions = options.attentions or (["efficient"] if options.quick else list(DEFAULT_ATTENTIONS))
    sizes = options.sizes or list(QUICK_SIZES if options.quick else FULL_SIZES)
    started = time.perf_counter()
    records = run_backbone_benchmark(backbones, attentions, sizes, options.batch_size, options.dtype,
                                     machine.device, options.repeats, options.point_seconds,
                                     options.max_call_seconds, machine.memory_limit_bytes)
    settings = {"backbones": backbones, "attentions": attentions, "sizes": sizes, "batch_size": options.batch_size,
                "dtype": options.dtype}
    document = results_document("backbone", argv, machine, settings, started, records)
    print(report.results_table(records, TABLE_COLUMNS))
    written = report.write_outputs(document, Path(options.output), "backbone", TABLE_COLUMNS)
    print("\n" + report.written_line(document, written))
    return document
