"""`lattn bench attention`: every mechanism against fused and materialised softmax attention, over N.

The command line: its options, the settings they make, and what the run prints and writes. What is
measured is in :mod:`.cases`, how one point is built in :mod:`.workloads`, how the points are run in
:mod:`.sweep`, and the project's speed targets checked on the results in :mod:`.targets`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report
from .cases import select_cases
from .command_line import Machine, add_machine_options, benchmark_parser, set_up_machine
from .crossover import crossovers, format_crossover
from .measure import DTYPES
from .settings import MODES, AttentionBenchSettings
from .sweep import run_attention_benchmark
from .targets import evaluate_targets

# N from ImageNet ViT-B/16 (14 x 14) to 256 x 256; 135 x 240 is stereo at 1/4 of 540 x 960.
FULL_SIZES = ("14x14", "32x32", "56x56", "64x64", "128x128", "135x240", "256x256")
QUICK_SIZES = ("14x14", "32x32", "64x64")

TABLE_COLUMNS = (
    ("case", "case", "s"), ("N", "n", "d"), ("dtype", "dtype", "s"), ("mode", "mode", "s"),
    ("time ms", "time_median_s", "ms"), ("spread ms", None, "spread"), ("peak MB", "peak_memory_bytes", "MB"),
    ("error", "error", "e"), ("GFLOP/s", "flops_per_s", "G"), ("%matmul", "flops_fraction", "%"),
    ("%copy bw", "bandwidth_fraction", "%"), ("x roofline", "roofline_ratio", "x"), ("status", "status", "s"),
)


def parse_grid(text: str) -> tuple[int, int]:
    """"HxW" -> (H, W); a plain N -> the most nearly square grid H x W = N."""
    if "x" in text:
        height, width = (int(part) for part in text.lower().split("x"))
    else:
        n = int(text)
        height = max(h for h in range(1, math.isqrt(n) + 1) if n % h == 0)
        width = n // height
    if height < 1 or width < 1:
        raise ValueError(f"a size must be N or HxW with positive H, W; got {text!r}")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(
        "attention",
        "Time, peak memory, error and roofline distance of every attention mechanism against fused and "
        "materialised softmax attention, over the token count N.",
        f"a reduced sweep: N of {', '.join(QUICK_SIZES)}, float32, 3 repeats "
        "(about 3 minutes on one core of a laptop CPU)",
    )
    parser.add_argument("--sizes", nargs="+", default=None,
                        help=f"token grids as HxW or N (default: {' '.join(FULL_SIZES)})")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="default: float32 bfloat16 (float32 with --quick)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cases", nargs="+", default=None,
                        help="case labels, or the words modules / ops / references (default: all)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--width", type=int, default=256, help="token width C (default 256)")
    parser.add_argument("--head-dim", type=int, default=64, help="head size d (default 64): heads = width / d")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 5; 3 quick)")
    parser.add_argument("--point-seconds", type=float, default=None,
                        help="stop repeating once a point's timed calls took this long, after 3 calls "
                        "(default 10; 0.5 quick)")
    parser.add_argument("--max-call-seconds", type=float, default=None,
                        help="do not run a point predicted (from the previous N) to take longer per call "
                        "(default 60; 10 quick)")
    add_machine_options(parser, "point")
    parser.add_argument("--output", default=None,
                        help="folder for attention.md/.json/.csv and the plots (default: bench_results/attention)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", metavar="FILE", default=None,
                        help="measure nothing: evaluate the targets and the crossover with fused softmax "
                        "on the results of an earlier run's attention.json and write its table, targets "
                        "and plots again (to --output, or next to FILE when --output is not given); "
                        "`lattn bench crossover --from FILE` only prints the crossover")
    return parser


def settings_from_arguments(options: argparse.Namespace, machine: Machine) -> AttentionBenchSettings:
    """The run's settings from the command line; the defaults of --quick where it is given."""
    sizes = options.sizes or (QUICK_SIZES if options.quick else FULL_SIZES)
    if options.width % options.head_dim:
        raise ValueError(f"--width {options.width} must be a multiple of --head-dim {options.head_dim}")
    return AttentionBenchSettings(
        sizes=[parse_grid(size) for size in sizes],
        dtypes=options.dtypes or (["float32"] if options.quick else ["float32", "bfloat16"]),
        modes=list(options.modes),
        cases=select_cases(options.cases),
        device=machine.device,
        batch_size=options.batch_size,
        width=options.width,
        head_dim=options.head_dim,
        warmup=options.warmup,
        repeats=options.repeats or (3 if options.quick else 5),
        point_seconds=options.point_seconds if options.point_seconds is not None else (0.5 if options.quick else 10.0),
        max_call_seconds=options.max_call_seconds or (10.0 if options.quick else 60.0),
        memory_limit_bytes=machine.memory_limit_bytes,
        seed=options.seed,
    )


def main(argv: Sequence[str]) -> dict[str, Any]:
    """`lattn bench attention ...`: measure, print the table and the targets, write the files."""
    options = build_parser().parse_args(list(argv))
    if options.from_json:
        return report_from_json(Path(options.from_json), None if options.output is None else Path(options.output),
                                plots=not options.no_plots)
    machine = set_up_machine(options)
    settings = settings_from_arguments(options, machine)
    started = time.perf_counter()
    document = run_attention_benchmark(settings)
    # Not command_line.results_document: saved runs have the sweep's key order, command and seconds last.
    document["settings"]["malloc"] = machine.malloc
    document["crossover"] = crossovers(document["results"])
    document["command"] = " ".join(["lattn", "bench", "attention", *argv])
    document["seconds"] = round(time.perf_counter() - started, 1)
    print(report.results_table(document["results"], TABLE_COLUMNS))
    print()
    print(report.format_targets(document["targets"]))
    print()
    print(format_crossover(document["crossover"]))
    written = report.write_outputs(document, Path(options.output or "bench_results/attention"), "attention",
                                   TABLE_COLUMNS, plots=not options.no_plots)
    print("\n" + report.written_line(document, written))
    return document


def report_from_json(path: Path, output: Path | None, plots: bool = True) -> dict[str, Any]:
    """`--from-json`: the targets and the crossover evaluated again on a saved run's results; its outputs
    written again."""
    document = json.loads(path.read_text())
    if document.get("benchmark") != "attention":
        raise ValueError(f"{path} is not the JSON of `lattn bench attention`")
    document["targets"] = evaluate_targets(document["results"])
    document["crossover"] = crossovers(document["results"])
    print(report.format_targets(document["targets"]))
    print()
    print(format_crossover(document["crossover"]))
    written = report.write_outputs(document, output or path.parent, "attention", TABLE_COLUMNS, plots=plots)
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return document
