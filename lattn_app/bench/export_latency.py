"""`lattn bench export`: latency of exported ONNX models in onnxruntime (CPU) against eager PyTorch.

    lattn bench export [--quick] [--tasks classification stereo ...] [--threads N] [--output FOLDER] [--overwrite]

For each quickstart network (built from its config, untrained: latency does not depend on the weights'
values) the ONNX file ``lattn export`` writes is made
in memory and both runtimes are timed in this one process, alternating call by call so that a busy
machine slows both alike. Reported: the fastest call of each runtime (other processes only ever add
time; the medians are in the JSON) and their ratio eager / onnxruntime (> 1: the ONNX model is faster). Results go to ``FOLDER/export_latency.{md,json}``.

Sizes are realistic ones, rounded up to the network's size multiple (an exported file takes multiples
of it; the eager network pads to it itself): stereo 544 x 960 (a 540 x 960 pair) at max_disparity 192,
classification 224 x 224, segmentation 512 x 512, detection 800 x 1333 (COCO's; torchvision's detector
pads it itself). Detection is the whole Mask R-CNN (boxes, labels, scores and pasted masks), against
torchvision's own eager inference, with the score threshold at 0 so that every image gives the most
detections (100, each with its mask); the eager time of every network is what its task computes
(``ExportWrapper.reference``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from .measure import machine_description, retain_freed_memory, set_threads

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# task -> (config, image size (height, width), what the data links to the model, quick image size, exported part)
CASES: dict[str, tuple[str, tuple[int, int], dict[str, Any], tuple[int, int], str]] = {
    "classification": ("classification_quickstart.yaml", (224, 224), {"num_classes": 10}, (64, 64), "all"),
    "stereo": ("sceneflow_efficient.yaml", (544, 960), {"max_disparity": 192}, (128, 256), "all"),
    "segmentation": ("segmentation_quickstart.yaml", (512, 512), {"num_classes": 150}, (128, 128), "all"),
    "detection": ("coco_quickstart.yaml", (800, 1333), {"num_classes": 80}, (320, 480), "all"),
}


def quickstart_task(config: str, from_data: dict[str, Any]):
    """The untrained model of a shipped config (the arguments its datamodule would link given here)."""
    from .. import tasks

    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    return getattr(tasks, model["class_path"])(**model["init_args"], **from_data).eval()


def export_latency(task_name: str, size: tuple[int, int] | None = None, repeats: int = 5) -> dict[str, Any]:
    """Seconds per call (fastest and median of `repeats`) of one quickstart network, eager and onnxruntime."""
    from ..export import export_model
    from ..export.command import onnx_session, relative_error, run_onnx
    from ..export.wrappers import export_wrapper

    config, default_size, from_data, _, part = CASES[task_name]
    size = size or default_size
    torch.manual_seed(0)
    task = quickstart_task(config, from_data)
    if task_name == "detection":  # the most work: detections_per_image detections (an untrained model has none)
        task.detector.roi_heads.score_thresh = 0.0
    wrapper = export_wrapper(task, part)
    started = time.perf_counter()
    content, _, _ = export_model(task, "onnx", size, check=False, part=part)  # run and compared below instead
    export_seconds = time.perf_counter() - started
    session = onnx_session(content, threads=torch.get_num_threads())  # as many threads as torch's: a fair race
    inputs = wrapper.example_inputs(size, batch=1)
    times: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
    with torch.no_grad():
        eager = wrapper.reference(*inputs)  # warm-up of both (first calls allocate and plan)
        exported = run_onnx(session, wrapper, inputs)
        for _ in range(repeats):
            for name, run in (("eager", lambda: wrapper.reference(*inputs)), ("onnxruntime", lambda: run_onnx(session, wrapper, inputs))):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    eager_outputs = eager if isinstance(eager, tuple) else (eager,)
    eager_s, onnx_s = min(times["eager"]), min(times["onnxruntime"])
    return {"task": task_name if part == "all" else f"{task_name} ({part})", "config": config, "size": list(size),
            "batch": 1, "repeats": repeats, "eager_s": eager_s, "onnxruntime_s": onnx_s,
            "eager_over_onnxruntime": eager_s / onnx_s, "eager_median_s": statistics.median(times["eager"]),
            "onnxruntime_median_s": statistics.median(times["onnxruntime"]),
            "export_s": export_seconds, "onnx_mb": len(content) / 1e6, "output_shapes": [list(t.shape) for t in eager_outputs],
            "relative_error": relative_error(exported, eager_outputs)}


def markdown(results: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [f"Machine: {machine.get('cpu')} ({machine.get('cpu_cores')} cores, torch threads: {machine.get('torch_threads')}), torch {machine.get('torch')}, onnxruntime {machine.get('onnxruntime')}; batch 1, fp32; load "
             f"average at the start {machine.get('load_average_at_start')}; malloc: {machine.get('malloc')}.", "",
             "| network | size | eager PyTorch | onnxruntime | eager / onnxruntime | ONNX file | relative error |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['task']} ({r['config']}) | {r['size'][0]} x {r['size'][1]} | {r['eager_s'] * 1e3:.1f} ms | "
                     f"{r['onnxruntime_s'] * 1e3:.1f} ms | {r['eager_over_onnxruntime']:.2f}x | {r['onnx_mb']:.1f} MB | "
                     f"{r['relative_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    """`lattn bench export`: time every chosen quickstart network and write the tables."""
    parser = argparse.ArgumentParser(prog="lattn bench export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small images and 2 repeats (a minute or two)")
    parser.add_argument("--tasks", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per runtime (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--output", default="benchmarks/export", help="folder of export_latency.{md,json}")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --output")
    parser.add_argument("--malloc", choices=("retain", "default"), default="retain",
                        help="retain (default): glibc keeps freed memory for reuse (as onnxruntime's own arena does) "
                             "instead of unmapping every buffer over 32 MB, which would charge eager PyTorch page "
                             "faults that onnxruntime does not pay; default: glibc as configured")
    options = parser.parse_args(list(argv))
    folder = Path(options.output)
    earlier = [path for path in (folder / "export_latency.md", folder / "export_latency.json") if path.exists()]
    if earlier and not options.overwrite:  # checked before minutes of measuring, not after
        raise FileExistsError(f"--output: {earlier[0]} holds an earlier run's results; pass --overwrite to replace them")
    set_threads(options.threads)
    retained = options.malloc == "retain" and retain_freed_memory()
    logging.getLogger("lattn_app").setLevel(logging.WARNING)
    import onnxruntime

    machine = {**machine_description(torch.device("cpu")), "onnxruntime": onnxruntime.__version__,
               "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
               "malloc": "retain freed memory (mallopt)" if retained else "default"}  # other processes slow both runtimes
    results = []
    for name in options.tasks:
        size = CASES[name][3] if options.quick else None  # None: the realistic size
        result = export_latency(name, size, 2 if options.quick else options.repeats)
        print(f"{name} {result['size'][0]}x{result['size'][1]}: eager {result['eager_s'] * 1e3:.1f} ms, onnxruntime "
              f"{result['onnxruntime_s'] * 1e3:.1f} ms ({result['eager_over_onnxruntime']:.2f}x)", flush=True)
        results.append(result)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "export_latency.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    (folder / "export_latency.md").write_text(markdown(results, machine))
    print(f"Results written to {folder / 'export_latency.md'} and {folder / 'export_latency.json'}")
