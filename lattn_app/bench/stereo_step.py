"""`lattn bench stereo`: the main job's training step against the previous main job's, side by side.

The main job (``configs/sceneflow_efficient.yaml``) trains on whole 128 x 256 images of the embedded set,
batch 4, ``max_disparity`` 48. This builds its network from the config's options (:data:`MAIN_JOB`, which a
test keeps equal to the config) and the previous main job's network (:data:`PREVIOUS`: three hourglasses
and PSMNet's trilinear full-resolution volume), and times a whole training step of each (forward, the
multi-output smooth-L1 loss, backward, AdamW step) in alternation
(:func:`~lattn_app.bench.measure.time_side_by_side`), with a breakdown of the main job's step: the
backbone, and the features (backbone + fusion + attention); the rest is the cost volume, the 3D
hourglasses and the upsampling. Ratios below 1: the main job's step is faster.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import report
from .command_line import add_machine_options, benchmark_parser, results_document, set_up_machine
from .measure import time_side_by_side

MAIN_JOB = {"backbone": "pyramid_tiny", "backbone_options": {"num_stages": 2}, "attention": "efficient",
            "options": dict(attention_depth=1, attention_heads=4, cross_attention=True, feature_dim=32,
                            cost_volume="gwc", groups=8, volume_channels=16, num_hourglasses=2,
                            img_size=(256, 512), upsampling="convex")}
# The main job before 2026-12-03: three hourglasses, the full-resolution trilinear volume.
PREVIOUS = {**MAIN_JOB["options"], "num_hourglasses": 3, "upsampling": "trilinear"}
FULL_POINTS = [(4, 128, 256, 48)]
QUICK_POINTS = [(1, 64, 128, 32)]


def stereo_network(options: dict[str, Any], max_disparity: int) -> nn.Module:
    from ..models.stereo import StereoNet, StereoNetOptions

    torch.manual_seed(0)
    return StereoNet(max_disparity, MAIN_JOB["backbone"], MAIN_JOB["backbone_options"], MAIN_JOB["attention"],
                     options=StereoNetOptions(**options))


def training_step_function(net: nn.Module, left: torch.Tensor, right: torch.Tensor, target: torch.Tensor):
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        loss = sum(F.smooth_l1_loss(output, target) for output in net(left, right))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure_point(batch: int, height: int, width: int, max_disparity: int, device: torch.device,
                  repeats: int) -> dict[str, Any]:
    previous = stereo_network(PREVIOUS, max_disparity).to(device)
    main_job = stereo_network(MAIN_JOB["options"], max_disparity).to(device)
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.rand(batch, 3, height, width, generator=generator).to(device) for _ in range(2))
    target = (torch.rand(batch, height, width, generator=generator) * (max_disparity - 1)).to(device)

    def features_step() -> None:
        a, b = main_job.features(left, right)
        (a.mean() + b.mean()).backward()

    def backbone_step() -> None:
        sum(level.mean() for level in main_job.backbone.forward_pyramid(torch.cat([left, right]))).backward()

    fns = [training_step_function(previous, left, right, target), training_step_function(main_job, left, right, target),
           features_step, backbone_step]
    previous_time, main_time, features_time, backbone_time = time_side_by_side(fns, device, warmup=1, repeats=repeats)
    return {"batch": batch, "height": height, "width": width, "max_disparity": max_disparity,
            "previous_seconds": previous_time.fastest, "main_job_seconds": main_time.fastest,
            "main_over_previous": main_time.fastest / previous_time.fastest,
            "median_ratio": main_time.median / previous_time.median,
            "backbone_share": backbone_time.fastest / main_time.fastest,
            "features_share": features_time.fastest / main_time.fastest}


COLUMNS = (("batch", "batch", "d"), ("height", "height", "d"), ("width", "width", "d"),
           ("max_disparity", "max_disparity", "d"), ("previous ms", "previous_seconds", "ms"),
           ("main job ms", "main_job_seconds", "ms"), ("main job / previous", "main_over_previous", "f3"),
           ("median main job / previous", "median_ratio", "f3"), ("backbone share", "backbone_share", "f3"),
           ("features share", "features_share", "f3"))


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("stereo", "The main job's training step against the previous main job's (three "
                              "hourglasses, trilinear upsampling), side by side, with the share of the backbone "
                              "and features.",
                              "batch 1 of 64 x 128, max_disparity 32")
    parser.add_argument("--repeats", type=int, default=5)
    add_machine_options(parser, "point")
    parser.add_argument("--output", default="bench_results/stereo")
    return parser


def main(argv: Sequence[str]) -> dict[str, Any]:
    options = build_parser().parse_args(list(argv))
    machine = set_up_machine(options)
    started = time.perf_counter()
    results = []
    for batch, height, width, max_disparity in QUICK_POINTS if options.quick else FULL_POINTS:
        row = measure_point(batch, height, width, max_disparity, machine.device, options.repeats)
        print(f"batch {batch} of {height} x {width}, max_disparity {max_disparity}: previous main job "
              f"{row['previous_seconds'] * 1e3:.0f} ms, main job {row['main_job_seconds'] * 1e3:.0f} ms per training "
              f"step (ratio {row['main_over_previous']:.3f}; backbone {row['backbone_share']:.0%}, features "
              f"{row['features_share']:.0%} of the main job's step)", flush=True)
        results.append(row)
    document = results_document("stereo", argv, machine, {"quick": options.quick, "repeats": options.repeats},
                                started, results)
    written = report.write_outputs(document, Path(options.output), "stereo", COLUMNS, plots=False)
    print(report.written_line(document, written))
    return document
