"""`lattn bench compile`: ``torch.compile`` against eager PyTorch, for every mechanism and the quickstart networks.

    lattn bench compile [--quick] [--mechanisms efficient performer ...] [--networks stereo ...]
                        [--sizes 64x64 128x128] [--mode default] [--threads N] [--output FOLDER]

Measured, each side by side in this one process (:func:`~lattn_app.bench.measure.time_side_by_side`):

- every registered mechanism as a module (width 256, 4 heads of 64, batch 1, fp32: as ``lattn bench
  attention``) at N = 4,096 (64 x 64) and 16,384 (128 x 128);
- the networks that ``--model.compile true`` compiles in each quickstart config (the task's
  :attr:`~lattn_app.tasks.base.LattnTask.compiled_part`), untrained, at the size and batch the config
  trains at: classification 32 x 32 (batch 32), stereo 128 x 256 (batch 4, the main job), segmentation
  64 x 64 (batch 8), detection 160 x 160 (batch 4: the backbone and FPN).

Each in two modes: ``inference`` (eval mode, no autograd) and ``training`` (train mode, forward and
backward; the networks also take an AdamW step). Per point: the graph breaks
(``torch._dynamo.explain``: 0 means one graph), the seconds of the first compiled call (the compilation),
the fastest eager and compiled call, their ratio compiled / eager (< 1: compiling pays), and the
relative difference of the outputs. Every point compiles afresh (``dynamic=False``: one graph per shape,
as a training run at a fixed size gets). Results go to ``FOLDER/compile.{md,json,csv}``.
"""

from __future__ import annotations

import argparse
import copy
import operator
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from . import report
from .cases import Case
from .command_line import add_machine_options, benchmark_parser, results_document, set_up_machine
from .measure import time_side_by_side
from .settings import AttentionBenchSettings
from .workloads import Workload

MODES = ("inference", "training")
SIZES = ((64, 64), (128, 128))
QUICK_SIZES = ((16, 16),)
# network -> (config, what the data links to the model, input size (height, width), batch)
NETWORKS: dict[str, tuple[str, dict[str, Any], tuple[int, int], int]] = {
    "classification": ("classification_quickstart.yaml", {"num_classes": 10}, (32, 32), 32),
    "stereo": ("sceneflow_efficient.yaml", {"max_disparity": 48}, (128, 256), 4),
    "segmentation": ("segmentation_quickstart.yaml", {"num_classes": 150}, (64, 64), 8),
    "detection": ("coco_quickstart.yaml", {"num_classes": 80}, (160, 160), 4),
}
QUICK_NETWORK_SIZE = ((32, 64), 1)


def graph_breaks(fn: Callable[..., Any], *args: Any) -> tuple[int, list[str]]:
    """Graph breaks of `fn(*args)` under torch.compile, and their reasons (dynamo only traces: nothing is compiled)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    reasons = sorted({str(item.reason).splitlines()[0] for item in explained.break_reasons})
    return explained.graph_break_count, reasons


def tensors_of(output: Any) -> list[Tensor]:
    """The tensors in a network's output (a tensor, or tuples, lists and dicts of them), in order."""
    found: list[Tensor] = []
    apply_to_collection(output, Tensor, found.append)
    return found


def relative_difference(eager: Any, compiled: Any) -> float:
    """The largest relative difference between matching output tensors of the two runs."""
    differences = []
    for e, c in zip(tensors_of(eager), tensors_of(compiled)):
        e, c = e.detach().double(), c.detach().double()
        differences.append(float((c - e).norm() / e.norm().clamp_min(1e-30)))
    return max(differences)


def compare(eager_call: Callable[[], Any], compiled_call: Callable[[], Any], device: torch.device,
            repeats: int) -> dict[str, Any]:
    """Compile (the first compiled call), check the outputs agree, and time both calls side by side."""
    started = time.perf_counter()
    compiled_output = compiled_call()
    compile_seconds = time.perf_counter() - started
    difference = relative_difference(eager_call(), compiled_output)
    eager, compiled = time_side_by_side([eager_call, compiled_call], device, warmup=1, repeats=repeats)
    return {"compile_seconds": compile_seconds, "eager_seconds": eager.fastest, "compiled_seconds": compiled.fastest,
            "compiled_over_eager": compiled.fastest / eager.fastest,
            "median_ratio": compiled.median / eager.median, "relative_difference": difference}


def mechanism_point(name: str, hw: tuple[int, int], mode: str, device: torch.device, repeats: int,
                    compile_options: dict[str, Any]) -> dict[str, Any]:
    """One mechanism at one grid in one mode: eager and compiled modules with the same weights."""
    settings = AttentionBenchSettings(sizes=[hw], dtypes=["float32"], modes=[], cases=[], device=device)
    case = Case(name, "module", name)
    eager, compiled = (Workload(case, hw, settings, torch.float32, device) for _ in range(2))  # same seed: same weights
    work_mode = "forward" if mode == "inference" else "forward+backward"
    for workload in (eager, compiled):
        workload.prepare(work_mode)
    with torch.set_grad_enabled(mode == "training"):
        breaks, reasons = graph_breaks(eager.forward, *eager.inputs)
    torch._dynamo.reset()
    compiled_module = torch.compile(compiled.module, dynamic=False, **compile_options)
    compiled.forward = lambda x: compiled_module(x, hw=hw)
    row = compare(lambda: eager.call(work_mode), lambda: compiled.call(work_mode), device, repeats)
    return {"what": name, "kind": "mechanism", "mode": mode, "size": f"{hw[0]}x{hw[1]}", "tokens": hw[0] * hw[1],
            "batch": 1, "graph_breaks": breaks, "break_reasons": reasons, **row}


def network_inputs(task_name: str, task: nn.Module, size: tuple[int, int], batch: int,
                   device: torch.device) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    views = 2 if task_name == "stereo" else 1
    images = [torch.rand(batch, 3, *size, generator=generator).to(device) for _ in range(views)]
    return tuple(task.normalize(image) for image in images)


def network_step(network: nn.Module, inputs: tuple[Tensor, ...], mode: str) -> Callable[[], Any]:
    """One inference call, or one training step (forward, the mean of every output as the loss, backward, AdamW)."""
    if mode == "inference":
        network.eval()

        def infer() -> Any:
            with torch.no_grad():
                return network(*inputs)
        return infer
    network.train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-6)

    def train() -> Any:
        output = network(*inputs)
        loss = sum(tensor.float().mean() for tensor in tensors_of(output))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return [tensor.detach() for tensor in tensors_of(output)]
    return train


def network_point(task_name: str, mode: str, device: torch.device, repeats: int, compile_options: dict[str, Any],
                  quick: bool) -> dict[str, Any]:
    """One quickstart network in one mode: the part `--model.compile true` compiles, eager and compiled."""
    from .export_latency import quickstart_task

    config, from_data, size, batch = NETWORKS[task_name]
    size, batch = QUICK_NETWORK_SIZE if quick else (size, batch)
    torch.manual_seed(0)
    task = quickstart_task(config, from_data).to(device)
    eager_network = operator.attrgetter(task.compiled_part)(task)
    compiled_network = copy.deepcopy(eager_network)
    inputs = network_inputs(task_name, task, size, batch, device)
    eager_step = network_step(eager_network, inputs, mode)
    # Training steps change the weights: the compiled copy starts from the same ones and takes the same steps.
    compiled_step = network_step(compiled_network, inputs, mode)
    with torch.set_grad_enabled(mode == "training"):
        breaks, reasons = graph_breaks(eager_network, *inputs)
    torch._dynamo.reset()
    compiled_network.compile(dynamic=False, **compile_options)
    row = compare(eager_step, compiled_step, device, repeats)
    return {"what": f"{task_name} ({Path(config).stem})", "kind": "network", "mode": mode,
            "size": f"{size[0]}x{size[1]}", "tokens": None, "batch": batch, "graph_breaks": breaks,
            "break_reasons": reasons, **row}


COLUMNS = (("what", "what", "s"), ("mode", "mode", "s"), ("size", "size", "s"), ("batch", "batch", "d"),
           ("graph breaks", "graph_breaks", "d"), ("compile s", "compile_seconds", "f1"),
           ("eager ms", "eager_seconds", "ms"), ("compiled ms", "compiled_seconds", "ms"),
           ("compiled / eager", "compiled_over_eager", "f3"), ("median compiled / eager", "median_ratio", "f3"),
           ("output rel. diff.", "relative_difference", "e"))


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    if not (height.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"a grid size is HEIGHTxWIDTH (e.g. 64x64); got {text!r}")
    return int(height), int(width)


def build_parser() -> argparse.ArgumentParser:
    from ..attention import list_attentions

    parser = benchmark_parser("compile", "torch.compile against eager PyTorch: every mechanism at N = 4,096 and "
                              "16,384 and the quickstart networks, inference and training, side by side.",
                              "grid 16 x 16 and networks at 32 x 64, batch 1: the pipeline in a few minutes")
    parser.add_argument("--mechanisms", nargs="*", default=None, choices=list_attentions(),
                        help="mechanisms to measure (default: all; none: `--mechanisms` alone)")
    parser.add_argument("--networks", nargs="*", default=None, choices=list(NETWORKS),
                        help="quickstart networks to measure (default: all; none: `--networks` alone)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                        help="mechanism grids HEIGHTxWIDTH (default: 64x64 128x128)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--mode", default="default",
                        help="torch.compile's mode: default, reduce-overhead, max-autotune, ...")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (inductor, aot_eager, ...)")
    parser.add_argument("--repeats", type=int, default=5)
    add_machine_options(parser, "point", malloc=False)
    parser.add_argument("--output", default="bench_results/compile")
    return parser


def main(argv: Sequence[str]) -> dict[str, Any]:
    from ..attention import list_attentions

    options = build_parser().parse_args(list(argv))
    machine = set_up_machine(options)
    compile_options = {"backend": options.backend, "mode": None if options.mode == "default" else options.mode}
    mechanisms = list_attentions() if options.mechanisms is None else options.mechanisms
    networks = list(NETWORKS) if options.networks is None else options.networks
    sizes = options.sizes or (QUICK_SIZES if options.quick else SIZES)
    started = time.perf_counter()
    points: list[Callable[[], dict[str, Any]]] = []
    for name in mechanisms:
        for hw in sizes:
            points += [lambda name=name, hw=hw, mode=mode: mechanism_point(name, hw, mode, machine.device,
                                                                           options.repeats, compile_options)
                       for mode in options.modes]
    for task_name in networks:
        points += [lambda task_name=task_name, mode=mode: network_point(task_name, mode, machine.device,
                                                                        options.repeats, compile_options, options.quick)
                   for mode in options.modes]
    results = []
    for point in points:
        row = point()
        results.append(row)
        print(f"{row['what']} {row['mode']} {row['size']}: {row['graph_breaks']} graph breaks, compiled in "
              f"{row['compile_seconds']:.1f} s; eager {row['eager_seconds'] * 1e3:.2f} ms, compiled "
              f"{row['compiled_seconds'] * 1e3:.2f} ms (ratio {row['compiled_over_eager']:.3f})", flush=True)
    torch._dynamo.reset()
    settings = {"quick": options.quick, "repeats": options.repeats, **compile_options}
    document = results_document("compile", argv, machine, settings, started, results)
    written = report.write_outputs(document, Path(options.output), "compile", COLUMNS, plots=False)
    print(report.written_line(document, written))
    return document
