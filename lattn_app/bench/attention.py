"""`lattn bench attention`: every mechanism against fused and materialised softmax attention, over N.

Each *case* is measured at each token count N (on an H x W grid), dtype and mode (forward, or
forward+backward) as one *point*: median time with its spread, peak extra memory, FLOPs, the output's
error against the exact attention it stands for, and the distance to the machine's roofline. Cases:

- the registered mechanisms as modules (projections included), plus the variants
  ``softmax-materialised`` (the N x N map built explicitly: the papers' "regular Transformer"),
  ``efficient-scaling`` (scaling normalisation) and ``care-block`` (CARE's block configuration);
- the bare operations given q, k, v: ``op:softmax-fused`` (``scaled_dot_product_attention``),
  ``op:softmax-materialised``, ``op:efficient`` and ``op:efficient-scaling``;
- the reference formulations of :mod:`lattn_app.bench.reference` (``reference:<mechanism>``).

The speed targets of the project are checked on the results (:func:`evaluate_targets`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..attention import attention_info, create_attention, list_attentions
from ..attention.base import QKVAttention
from ..attention.efficient import efficient_attention
from . import report
from .measure import (
    DTYPES,
    LOST_EVENTS_NOTE,
    MemoryCap,
    Roofline,
    memory_limit_bytes,
    call_with_peak_memory,
    paired_ratio,
    counting_flops,
    is_out_of_memory,
    machine_description,
    measure_roofline,
    resolve_device,
    retain_freed_memory,
    set_threads,
    tensor_bytes,
    time_calls,
    time_side_by_side,
)
from .reference import REFERENCES

MODES = ("forward", "forward+backward")
# N from ImageNet ViT-B/16 (14 x 14) to 256 x 256; 135 x 240 is stereo at 1/4 of 540 x 960.
FULL_SIZES = ("14x14", "32x32", "56x56", "64x64", "128x128", "135x240", "256x256")
QUICK_SIZES = ("14x14", "32x32", "64x64")
ROOFLINE_REPROBE_SECONDS = 60.0
ERROR_ROWS = 256  # the error is measured on this many query rows (exact attention of all N is O(N^2))

# Mechanisms whose time is linear in N (the registry's complexity), checked for N^1.15 growth.
LINEAR_CASES = ("efficient", "efficient-scaling", "op:efficient", "performer", "linformer", "nystrom", "care",
                "care-block", "mixer")
# fnet is O(N C log(N C)) (FFTs): its growth is shown as a supplementary line, not held to N^1.15 (the log
# factor alone makes N^1.11 from N=1024 to 65536). coupling, O(N (H + W) d) = O(N^1.5) on square grids,
# is not listed.
SUPPLEMENTARY_GROWTH_CASES = ("fnet",)


# ----------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: a module, an operation, or a reference formulation."""

    label: str
    kind: str  # "module", "op" or "reference"
    name: str  # registry name (module), operation name (op) or REFERENCES key (reference)
    options: dict[str, Any] = field(default_factory=dict)
    exact: str | None = "softmax"  # the exact attention its error is measured against (None: not one)


OPERATIONS = {
    "softmax-fused": "softmax",
    "softmax-materialised": "softmax",
    "efficient": "softmax",
    "efficient-scaling": "dot-product",
}
MODULE_VARIANTS = (
    Case("softmax-materialised", "module", "softmax", {"fused": False}),
    Case("efficient-scaling", "module", "efficient", {"normalization": "scaling"}, exact="dot-product"),
    Case("care-block", "module", "care", {"value_projection": False, "output_projection": False}),
)


def all_cases() -> list[Case]:
    """Every case: registered mechanisms (plug-ins too), variants, operations, reference formulations."""
    cases = []
    for name in list_attentions():
        builder = attention_info(name).builder
        has_qkv = isinstance(builder, type) and issubclass(builder, QKVAttention)  # fnet, mixer: no q, k, v
        cases.append(Case(name, "module", name, exact="softmax" if has_qkv else None))
    cases += MODULE_VARIANTS
    cases += [Case(f"op:{name}", "op", name, exact=exact) for name, exact in OPERATIONS.items()]
    cases += [Case(f"reference:{key}", "reference", key, exact=None) for key in REFERENCES]
    return cases


def select_cases(selection: Sequence[str] | None) -> list[Case]:
    """Cases by label; the words "modules", "ops" and "references" select a whole kind."""
    cases = all_cases()
    if not selection:
        return cases
    kinds = {"modules": "module", "ops": "op", "references": "reference"}
    chosen = []
    for word in selection:
        matches = [c for c in cases if c.label == word or kinds.get(word) == c.kind]
        if not matches:
            raise ValueError(f"unknown case {word!r}; choose from modules, ops, references or "
                             f"{', '.join(c.label for c in cases)}")
        chosen += [c for c in matches if c not in chosen]
    return chosen


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


# ------------------------------------------------------------------------------------- workloads


def _exact_rows(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, exact: str) -> Tensor:
    """Rows `rows` of exact attention in float64, per head: (B, h, R, d). One head at a time, so that the
    R x N scores stay small at large N."""
    out = torch.empty(*q.shape[:-2], len(rows), v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = q[b, h, rows].double() @ k[b, h].double().T
            if exact == "softmax":
                weights = torch.softmax(scores / q.shape[-1] ** 0.5, dim=-1)
            else:  # dot-product attention, the exact form of efficient attention with scaling normalisation
                weights = scores / k.shape[-2]
            out[b, h] = weights @ v[b, h].double()
    return out


class Workload:
    """One case built for one grid, dtype and device: its inputs, parameters and a call."""

    def __init__(self, case: Case, hw: tuple[int, int], settings: AttentionBenchSettings,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.case = case
        self.hw = hw
        n = hw[0] * hw[1]
        generator = torch.Generator().manual_seed(settings.seed)
        torch.manual_seed(settings.seed)
        heads = settings.width // settings.head_dim
        self.module: nn.Module | None = None
        if case.kind == "op":
            shape = (settings.batch_size, heads, n, settings.head_dim)
            self.inputs = [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(3)]
            self.forward = self._operation(case.name)
        else:
            x = torch.randn(settings.batch_size, n, settings.width, generator=generator)
            if case.kind == "module":
                options = dict(case.options)
                if attention_info(case.name).fixed_grid:
                    options.setdefault("grid_size", hw)
                if case.name == "mixer":
                    options.setdefault("num_prefix_tokens", 0)
                self.module = create_attention(case.name, dim=settings.width, num_heads=heads, **options)
                self.inputs = [x]
                self.forward = lambda x: self.module(x, hw=hw)
            else:
                reference = REFERENCES[case.name]
                self.module = reference.build(settings.width, heads, hw, **reference.options)
                self.inputs = list(self.module.prepare(x, hw))
                self.forward = lambda *args: self.module(*args)
            self.module.to(device, dtype)
            self.inputs = [t.to(device, dtype) for t in self.inputs]
        self.parameters = [] if self.module is None else list(self.module.parameters())
        self.grad_output = torch.randn(self.inputs[0].shape, generator=generator).to(device, dtype)

    @staticmethod
    def _operation(name: str) -> Callable[..., Tensor]:
        if name == "softmax-fused":
            return F.scaled_dot_product_attention
        if name == "softmax-materialised":
            return lambda q, k, v: torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
        if name == "efficient":
            return efficient_attention
        if name == "efficient-scaling":
            return lambda q, k, v: efficient_attention(q, k, v, normalization="scaling")
        raise ValueError(f"unknown operation {name!r}")

    def call(self, mode: str) -> Tensor:
        """One forward (without autograd), or one forward and backward pass (after freeing the previous
        pass's gradients, as a training step's ``zero_grad(set_to_none=True)`` does)."""
        if mode == "forward":
            with torch.no_grad():
                return self.forward(*self.inputs)
        self.free_gradients()
        out = self.forward(*self.inputs)
        out.backward(self.grad_output)
        return out

    def free_gradients(self) -> None:
        for tensor in self.inputs + self.parameters:
            tensor.grad = None

    def prepare(self, mode: str) -> None:
        training = mode != "forward"
        for tensor in self.inputs:
            tensor.requires_grad_(training)
        if self.module is not None:
            self.module.train(training)

    def essential_bytes(self, mode: str) -> int:
        """Bytes any implementation must move: inputs and weights read, output written (and, with the
        backward pass, the output's gradient read and the inputs' and weights' gradients written)."""
        inputs = tensor_bytes(self.inputs + self.parameters)
        output = tensor_bytes([self.grad_output])
        return inputs + output if mode == "forward" else 2 * (inputs + output)

    def error(self, out: Tensor) -> float | None:
        """Relative error of `out` against the exact attention of this case's q, k, v, on a set of rows."""
        exact = self.case.exact
        if exact is None:
            return None
        n = self.hw[0] * self.hw[1]
        rows = torch.linspace(0, n - 1, min(ERROR_ROWS, n)).round().long().unique().to(out.device)
        with torch.no_grad():
            if self.case.kind == "op":
                expected = _exact_rows(*self.inputs, rows, exact)
                got = out[..., rows, :].double()
            else:
                module = copy.deepcopy(self.module).double().eval()
                x = self.inputs[0].double()
                q, k, v = module.project(x, None)
                per_head = _exact_rows(q, k, v, rows, exact)
                expected = module.proj(per_head.transpose(1, 2).flatten(2))
                got = out[:, rows].double()
        return float((got - expected).norm() / expected.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------ settings


@dataclass
class AttentionBenchSettings:
    sizes: list[tuple[int, int]]
    dtypes: list[str]
    modes: list[str]
    cases: list[Case]
    device: torch.device
    batch_size: int = 1
    width: int = 256
    head_dim: int = 64
    warmup: int = 1
    repeats: int = 5
    point_seconds: float = 10.0
    max_call_seconds: float = 60.0
    memory_limit_bytes: int | None = None
    seed: int = 0

    @property
    def short_point_seconds(self) -> float:
        """Short points (and pairs) are repeated until their timed calls took this long in all."""
        return min(1.0, self.point_seconds / 4)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["sizes"] = [f"{h}x{w}" for h, w in self.sizes]
        values["cases"] = [case.label for case in self.cases]
        values["device"] = str(self.device)
        return values


# ------------------------------------------------------------------------------------- running


def _point_record(case: Case, hw: tuple[int, int], dtype: str, mode: str, settings: AttentionBenchSettings,
                  **values: Any) -> dict[str, Any]:
    record = {
        "case": case.label, "kind": case.kind, "mechanism": case.name, "options": dict(case.options),
        "n": hw[0] * hw[1], "grid": f"{hw[0]}x{hw[1]}", "dtype": dtype, "mode": mode,
        "device": str(settings.device), "batch_size": settings.batch_size, "width": settings.width,
        "head_dim": settings.head_dim, "status": "ok", "note": "",
        "time_median_s": None, "time_fastest_s": None, "time_slowest_s": None, "repeats": 0,
        "peak_memory_bytes": None, "flops": None, "bytes": None,
        "flops_per_s": None, "flops_fraction": None, "bytes_per_s": None, "bandwidth_fraction": None,
        "roofline_s": None, "roofline_ratio": None, "error": None, "error_against": case.exact,
        # reference rows only: lattn's case and the reference timed in alternation (see measure_pair)
        "paired_case": None, "paired_ours_fastest_s": None, "paired_reference_fastest_s": None,
        "paired_time_ratio": None, "paired_rounds": None,
    }
    record.update(values)
    return record


def measure_point(workload: Workload, mode: str, settings: AttentionBenchSettings,
                  roofline: Roofline) -> tuple[dict[str, Any], Tensor]:
    """Measure one point: a call for the peak memory, a call counting FLOPs (both also warm the caches),
    then the timed calls. Returns the measurements and the first call's output (for the error)."""
    device = settings.device
    workload.prepare(mode)

    def output_bytes(out: Tensor) -> int:
        """A floor of the call's true peak: its output and the gradients its backward pass wrote (all
        allocated by the call and alive at its end); a lower reading means the profiler lost events."""
        grads = [t.grad for t in workload.inputs + workload.parameters if t.grad is not None]
        return tensor_bytes([out, *grads])

    started = time.perf_counter()
    # Every memory reading starts without gradients, so the peak includes the ones the backward pass writes.
    out, peak = call_with_peak_memory(lambda: workload.call(mode), device, at_least=output_bytes,
                                      before_each=workload.free_gradients)
    first_call_seconds = time.perf_counter() - started
    out = out.detach()
    # FLOPs in a call of their own: under the counter's dispatch mode, composite operations run decomposed
    # (e.g. a linear layer on a transposed input as an explicit copy and product), which changes memory.
    with counting_flops() as counter:
        workload.call(mode)
    flops = counter.get_total_flops()
    # A call that took over a second is warm after these two.
    warmup = settings.warmup if first_call_seconds < 1.0 else 0
    timing = time_calls(lambda: workload.call(mode), device, warmup=warmup, repeats=settings.repeats,
                        budget_seconds=settings.point_seconds, min_seconds=settings.short_point_seconds)
    values = {
        "time_median_s": timing.median, "time_fastest_s": timing.fastest, "time_slowest_s": timing.slowest,
        "repeats": timing.repeats, "peak_memory_bytes": peak, "flops": flops,
        "bytes": workload.essential_bytes(mode),
    }
    return roofline_values(values, roofline), out


def roofline_values(record: dict[str, Any], roofline: Roofline) -> dict[str, Any]:
    """`record` with its achieved FLOP/s and bytes/s, as fractions of the machine's, and its distance to
    the roofline minimum max(FLOPs / FLOP/s, bytes / bandwidth)."""
    flops, num_bytes, seconds = record["flops"], record["bytes"], record["time_median_s"]
    minimum = roofline.minimum_seconds(flops, num_bytes)
    record.update({
        "flops_per_s": flops / seconds,
        "flops_fraction": flops / seconds / roofline.matmul_flops_per_second,
        "bytes_per_s": num_bytes / seconds,
        "bandwidth_fraction": num_bytes / seconds / roofline.copy_bytes_per_second,
        "roofline_s": minimum, "roofline_ratio": seconds / minimum if minimum > 0 else None,
    })
    return record


# Rounds a pair gets while its budget (--point-seconds) lasts: the target is passed or failed on the
# median of the rounds' ratios, and on the 6 to 7 rounds that 1 s bought at N=1024 forward+backward
# (about 90 ms a call) that median moved by up to 8% between runs of the same pair.
PAIR_ROUNDS = 15


def measure_pair(reference: Workload, ours: Workload, mode: str, settings: AttentionBenchSettings,
                 warm: bool) -> dict[str, Any]:
    """lattn's case and its reference formulation timed in alternation, call by call: their time ratio,
    free of the drift in load that separate measurements minutes apart suffer on a shared machine."""
    ours.prepare(mode)
    reference.prepare(mode)
    ours_timing, reference_timing = time_side_by_side(
        [lambda: ours.call(mode), lambda: reference.call(mode)], settings.device,
        warmup=0 if warm else settings.warmup, repeats=max(settings.repeats, PAIR_ROUNDS),
        budget_seconds=settings.point_seconds,
        min_seconds=settings.short_point_seconds,
    )
    return {"paired_case": ours.case.label, "paired_ours_fastest_s": ours_timing.fastest,
            "paired_reference_fastest_s": reference_timing.fastest,
            "paired_time_ratio": paired_ratio(ours_timing, reference_timing), "paired_rounds": ours_timing.repeats}


class AttentionSweep:
    """Runs every point of `settings`, keeping what later points need: the previous N's time of each case
    (to skip points predicted too slow), the N at which a case ran out of memory, and the forward errors."""

    def __init__(self, settings: AttentionBenchSettings) -> None:
        self.settings = settings
        self.device = settings.device
        self.cases_by_label = {case.label: case for case in settings.cases}
        self.rooflines = {dtype: measure_roofline(self.device, DTYPES[dtype]) for dtype in settings.dtypes}
        self.probed_at = {dtype: time.perf_counter() for dtype in settings.dtypes}
        self.last_time: dict[tuple[str, str, str], tuple[int, float]] = {}  # (case, dtype, mode) -> (N, s)
        self.out_of_memory_at: dict[tuple[str, str, str], int] = {}
        self.errors: dict[tuple[str, str, str], float | None] = {}  # (case, grid, dtype) -> forward error
        self.workload: Workload | None = None  # of the case being measured, shared by its modes

    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        settings = self.settings
        records = []
        total = len(settings.cases) * len(settings.sizes) * len(settings.dtypes) * len(settings.modes)
        with tqdm(total=total, disable=not progress, unit="point", dynamic_ncols=True) as bar:
            # Every case at one N before the next N: cases compared with each other are measured minutes
            # apart at most, under the same load of a shared machine.
            for dtype in settings.dtypes:
                for hw in settings.sizes:
                    # Probed again at every N (unless the last probe is under a minute old): the best
                    # reading of the run is the machine's.
                    if time.perf_counter() - self.probed_at.get(dtype, -math.inf) > ROOFLINE_REPROBE_SECONDS:
                        probe = measure_roofline(self.device, DTYPES[dtype])
                        self.rooflines[dtype] = self.rooflines[dtype].best(probe)
                        self.probed_at[dtype] = time.perf_counter()
                    for case in settings.cases:
                        self.workload = None
                        for mode in settings.modes:
                            bar.set_description(f"{case.label} N={hw[0] * hw[1]} {dtype} {mode}")
                            records.append(self.point(case, hw, dtype, mode))
                            bar.update()
                        self.workload = None
        for record in records:  # the error is a property of the forward output: shown on both modes
            if record["error"] is None:
                record["error"] = self.errors.get((record["case"], record["grid"], record["dtype"]))
            if record["status"] == "ok":  # against the best roofline probe of the whole run
                roofline_values(record, self.rooflines[record["dtype"]])
                if not memory_is_trusted(record):  # still below its floor after call_with_peak_memory's tries
                    record["note"] = "; ".join(filter(None, [record["note"], LOST_EVENTS_NOTE]))
        return records

    def point(self, case: Case, hw: tuple[int, int], dtype: str, mode: str) -> dict[str, Any]:
        """One point's record: measured, or why not (skipped, oom, error)."""
        settings, n = self.settings, hw[0] * hw[1]
        key = (case.label, dtype, mode)
        record = _point_record(case, hw, dtype, mode, settings)
        skip = _skip_reason(key, n, self.last_time, self.out_of_memory_at, settings)
        if skip is not None:
            record.update(status=skip[0], note=skip[1])
            return record

        outputs = []

        def measure() -> None:
            if self.workload is None:
                self.workload = Workload(case, hw, settings, DTYPES[dtype], self.device)
            values, out = measure_point(self.workload, mode, settings, self.rooflines[dtype])
            record.update(values)
            outputs.append(out)

        if not self.guarded(measure, record, out_of_memory_key=key):
            self.workload = None
            return record
        self.last_time[key] = (n, record["time_median_s"])
        if mode == "forward":  # outside the memory cap: the exact attention is not part of the point
            record["error"] = self.workload.error(outputs.pop())
            self.errors[(case.label, record["grid"], dtype)] = record["error"]
        outputs.clear()
        ours_case = self.cases_by_label.get(REFERENCES[case.name].ours) if case.kind == "reference" else None
        if ours_case is not None:
            pair: dict[str, Any] = {}

            def time_pair() -> None:
                ours = Workload(ours_case, hw, settings, DTYPES[dtype], self.device)
                pair.update(measure_pair(self.workload, ours, mode, settings, warm=record["time_median_s"] > 1.0))

            if self.guarded(time_pair, pair):
                record.update(pair)
            else:
                record["note"] = f"not timed in alternation with {ours_case.label}: {pair['note']}"
        return record

    def guarded(self, action: Callable[[], None], record: dict[str, Any],
                out_of_memory_key: tuple[str, str, str] | None = None) -> bool:
        """Run `action` under the memory cap. Out of memory, or any other failure, is written into
        `record` as its status and note instead of stopping the sweep; returns whether it succeeded."""
        limit = self.settings.memory_limit_bytes
        try:
            with MemoryCap(limit, self.device):
                action()
            return True
        except Exception as failure:
            if is_out_of_memory(failure):
                if out_of_memory_key is not None:
                    self.out_of_memory_at[out_of_memory_key] = int(record["n"])
                record.update(status="oom", note="out of memory" + (f" (limit {limit / 2**30:.1f} GiB)" if limit else ""))
            else:
                record.update(status="error", note=f"{type(failure).__name__}: {failure}")
        # Here, after the except block, the traceback and the tensors its frames held are gone.
        gc.collect()
        _empty_cache(self.device)
        return False


def run_attention_benchmark(settings: AttentionBenchSettings, progress: bool = True) -> dict[str, Any]:
    """Measure every point of `settings`; returns the results document (see :func:`main`)."""
    sweep = AttentionSweep(settings)
    records = sweep.run(progress)
    return {
        "benchmark": "attention",
        "machine": machine_description(settings.device),
        "settings": settings.as_dict(),
        "roofline": {dtype: roofline.as_dict() for dtype, roofline in sweep.rooflines.items()},
        "results": records,
        "targets": evaluate_targets(records),
    }


def _skip_reason(key: tuple[str, str, str], n: int, last_time: dict, out_of_memory_at: dict,
                 settings: AttentionBenchSettings) -> tuple[str, str] | None:
    if key in out_of_memory_at and n > out_of_memory_at[key]:
        return "oom", f"not run: out of memory already at N={out_of_memory_at[key]}"
    if key in last_time:
        previous_n, previous_seconds = last_time[key]
        predicted = previous_seconds * (n / previous_n) ** 2  # quadratic: safe for every mechanism
        if predicted > settings.max_call_seconds:
            return "skipped", (f"not run: ~{predicted:.0f} s per call predicted from N={previous_n} "
                               f"(> --max-call-seconds {settings.max_call_seconds:g})")
    return None


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- targets


def growth_exponent(points: Sequence[tuple[int, float]]) -> float:
    """The least-squares slope of log(time) against log(N): time ~ N^slope. Every size counts, so one
    point slowed by the load of a shared machine moves it less than it moves a ratio of two points."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(seconds) for _, seconds in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


# Targets compare the fastest call of each point: other processes on a shared machine only ever add time,
# so the fastest call is the steadiest estimate of a point's own cost (the tables show the median too).
TARGET_TIME = "time_fastest_s"


def memory_floor_bytes(record: dict[str, Any]) -> int:
    """A floor under any true peak of a point's call: the output it returns (B x N x width elements, for
    every case) and, with the backward pass, the gradients it writes (one per input and weight, so that
    output + gradients = half of the essential bytes). A lower reading means the CPU profiler lost
    allocation events; such a reading is not compared."""
    output = record["batch_size"] * record["n"] * record["width"] * torch.finfo(DTYPES[record["dtype"]]).bits // 8
    return output if record["mode"] == "forward" else record["bytes"] // 2


def memory_is_trusted(record: dict[str, Any]) -> bool:
    return record.get("peak_memory_bytes") is not None and record["peak_memory_bytes"] >= memory_floor_bytes(record)


def _find(records: list[dict], case: str, n: int, mode: str, dtype: str = "float32") -> dict | None:
    for record in records:
        if (record["case"], record["n"], record["mode"], record["dtype"]) == (case, n, mode, dtype) \
                and record["status"] == "ok":
            return record
    return None


def _target(name: str, statement: str, threshold: str, measured: str, passed: bool | None,
            supplementary: bool = False) -> dict[str, Any]:
    return {"target": name, "statement": statement, "threshold": threshold, "measured": measured,
            "passed": passed, "supplementary": supplementary}


def evaluate_targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's speed and memory targets, checked on fp32 results of batch 1, head size 64, width 256.

    A target whose points were not measured (e.g. after ``--quick``) has ``passed = None``.
    """
    records = [r for r in records if (r["batch_size"], r["head_dim"], r["width"]) == (1, 64, 256)]
    targets = []

    def speedup(name: str, statement: str, slow: str, fast: str, threshold: float) -> None:
        a, b = _find(records, slow, 16384, "forward+backward"), _find(records, fast, 16384, "forward+backward")
        if a is None or b is None:
            targets.append(_target(name, statement, f">= {threshold:g}x", "not measured", None))
            return
        ratio = a[TARGET_TIME] / b[TARGET_TIME]
        measured = f"{ratio:.1f}x ({a[TARGET_TIME] * 1e3:.0f} ms / {b[TARGET_TIME] * 1e3:.1f} ms)"
        targets.append(_target(name, statement, f">= {threshold:g}x", measured, ratio >= threshold))

    speedup("efficient op vs fused softmax",
            "forward+backward at N=16384: op:efficient at least 50x faster than op:softmax-fused",
            "op:softmax-fused", "op:efficient", 50)
    speedup("efficient module vs softmax module",
            "forward+backward at N=16384: the efficient module at least 20x faster than the softmax module",
            "softmax", "efficient", 20)

    for case in LINEAR_CASES + SUPPLEMENTARY_GROWTH_CASES:
        supplementary = case in SUPPLEMENTARY_GROWTH_CASES
        for mode in MODES:
            statement = f"{case} {mode}: time grows at most as N^1.15 from N=1024 to N=65536"
            if supplementary:
                statement += " (supplementary: O(N log N), not a linear mechanism)"
            points = sorted((r["n"], r[TARGET_TIME]) for r in records if r["case"] == case and r["mode"] == mode
                            and r["dtype"] == "float32" and r["status"] == "ok" and 1024 <= r["n"] <= 65536)
            if len(points) < 2 or points[0][0] != 1024 or points[-1][0] != 65536:
                targets.append(_target(f"growth {case} {mode}", statement, "<= 1.15", "not measured", None,
                                       supplementary))
                continue
            exponent = growth_exponent(points)
            endpoints = math.log(points[-1][1] / points[0][1]) / math.log(65536 / 1024)
            measured = f"N^{exponent:.2f} (fit over {len(points)} sizes; endpoints alone N^{endpoints:.2f})"
            targets.append(_target(f"growth {case} {mode}", statement, "<= 1.15", measured, exponent <= 1.15,
                                   supplementary))

    # "efficient forward" is the registered mechanism, i.e. the module. The bare operation is reported next
    # to it as a supplementary line: its products have an inner size of d = 64, at which no BLAS reaches
    # the large square matrix product's FLOP/s that the roofline assumes.
    for case, supplementary in (("efficient", False), ("op:efficient", True)):
        ratios = [(r["n"], r[TARGET_TIME] / r["roofline_s"]) for r in records
                  if r["case"] == case and r["mode"] == "forward" and r["dtype"] == "float32"
                  and r["status"] == "ok" and r["n"] >= 16384 and r.get("roofline_s")]
        statement = f"{case} forward within 2x of the roofline minimum at N >= 16384"
        if supplementary:
            statement += " (supplementary: the operation without its projections)"
        if not ratios:
            targets.append(_target(f"roofline {case}", statement, "<= 2.0x", "not measured", None, supplementary))
            continue
        measured = ", ".join(f"{ratio:.2f}x at N={n}" for n, ratio in ratios)
        targets.append(_target(f"roofline {case}", statement, "<= 2.0x", measured,
                               all(ratio <= 2.0 for _, ratio in ratios), supplementary))

    # Runs from before the rounds' ratios were recorded are compared by their fastest alternated calls.
    by_rounds = any(record.get("paired_time_ratio") is not None for record in records)
    ratio_of = "the median of the rounds' ratios" if by_rounds else "the ratio of the fastest calls"
    for key, reference in REFERENCES.items():
        statement = (f"{reference.ours} at least as fast (within {REFERENCE_TIME_TOLERANCE:.0%} timing noise) "
                     f"and no hungrier than reference:{key}, every N and mode (timed in alternation: {ratio_of})")
        pairs, lost = [], []
        for record in records:
            if record["case"] != f"reference:{key}" or record["status"] != "ok" or record["dtype"] != "float32":
                continue
            ours = _find(records, reference.ours, record["n"], record["mode"])
            if ours is None:
                continue
            if record.get("paired_time_ratio") is not None:
                time_ratio = record["paired_time_ratio"]
            elif record.get("paired_ours_fastest_s") is not None:  # a run from before the median of rounds
                time_ratio = record["paired_ours_fastest_s"] / record["paired_reference_fastest_s"]
            else:
                time_ratio = ours[TARGET_TIME] / record[TARGET_TIME]
            if memory_is_trusted(ours) and memory_is_trusted(record):
                memory_ratio = ours["peak_memory_bytes"] / record["peak_memory_bytes"]
            else:
                memory_ratio = None
                lost.append(f"N={record['n']} {record['mode']}")
            pairs.append((record["n"], record["mode"], time_ratio, memory_ratio))
        if not pairs:
            targets.append(_target(f"reference {key}", statement, "time <= 1x, memory <= 1x", "not measured", None))
            continue
        worst_time = max(pairs, key=lambda p: p[2])
        measured = (f"time {min(p[2] for p in pairs):.2f}-{worst_time[2]:.2f}x (worst at N={worst_time[0]} "
                    f"{worst_time[1]})")
        compared = [p for p in pairs if p[3] is not None]
        if compared:
            worst_memory = max(compared, key=lambda p: p[3])
            measured += (f", memory {min(p[3] for p in compared):.2f}-{worst_memory[3]:.2f}x "
                         f"(worst at N={worst_memory[0]} {worst_memory[1]})")
        if lost:
            measured += f"; memory not compared at {', '.join(lost)} (a reading below its floor: events lost)"
        passed = (worst_time[2] <= 1 + REFERENCE_TIME_TOLERANCE
                  and all(p[3] <= 1.0 for p in compared))
        targets.append(_target(f"reference {key}", statement, "time <= 1x, memory <= 1x", measured, passed))
    return targets


REFERENCE_TIME_TOLERANCE = 0.05  # timings of equal work differ by a few % between runs on a shared machine


# ----------------------------------------------------------------------------------------- command


TABLE_COLUMNS = (
    ("case", "case", "s"), ("N", "n", "d"), ("dtype", "dtype", "s"), ("mode", "mode", "s"),
    ("time ms", "time_median_s", "ms"), ("spread ms", None, "spread"), ("peak MB", "peak_memory_bytes", "MB"),
    ("error", "error", "e"), ("GFLOP/s", "flops_per_s", "G"), ("%matmul", "flops_fraction", "%"),
    ("%copy bw", "bandwidth_fraction", "%"), ("x roofline", "roofline_ratio", "x"), ("status", "status", "s"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lattn bench attention",
        description="Time, peak memory, error and roofline distance of every attention mechanism against "
        "fused and materialised softmax attention, over the token count N.",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"a reduced sweep: N of {', '.join(QUICK_SIZES)}, float32, 3 repeats "
                        "(about 3 minutes on one core of a laptop CPU)")
    parser.add_argument("--sizes", nargs="+", default=None,
                        help=f"token grids as HxW or N (default: {' '.join(FULL_SIZES)})")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="default: float32 bfloat16 (float32 with --quick)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cases", nargs="+", default=None,
                        help="case labels, or the words modules / ops / references (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
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
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="GiB one point may allocate; beyond it the point is out of memory (default: "
                        "half the available memory on CPU, none on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--malloc", choices=("retain", "default"), default="retain",
                        help="retain (default): glibc keeps freed memory for reuse, as jemalloc/tcmalloc do, "
                        "instead of unmapping every buffer over 32 MB on free; default: glibc as configured")
    parser.add_argument("--output", default=None,
                        help="folder for attention.md/.json/.csv and the plots (default: bench_results/attention)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", metavar="FILE", default=None,
                        help="measure nothing: evaluate the targets on the results of an earlier run's "
                        "attention.json and write its table, targets and plots again (to --output, or "
                        "next to FILE when --output is not given)")
    return parser


def settings_from_arguments(options: argparse.Namespace) -> AttentionBenchSettings:
    device = resolve_device(options.device)
    sizes = options.sizes or (QUICK_SIZES if options.quick else FULL_SIZES)
    if options.width % options.head_dim:
        raise ValueError(f"--width {options.width} must be a multiple of --head-dim {options.head_dim}")
    memory_limit = memory_limit_bytes(options.memory_limit, device)
    return AttentionBenchSettings(
        sizes=[parse_grid(size) for size in sizes],
        dtypes=options.dtypes or (["float32"] if options.quick else ["float32", "bfloat16"]),
        modes=list(options.modes),
        cases=select_cases(options.cases),
        device=device,
        batch_size=options.batch_size,
        width=options.width,
        head_dim=options.head_dim,
        warmup=options.warmup,
        repeats=options.repeats or (3 if options.quick else 5),
        point_seconds=options.point_seconds if options.point_seconds is not None else (0.5 if options.quick else 10.0),
        max_call_seconds=options.max_call_seconds or (10.0 if options.quick else 60.0),
        memory_limit_bytes=memory_limit,
        seed=options.seed,
    )


def main(argv: Sequence[str]) -> dict[str, Any]:
    """`lattn bench attention ...`: measure, print the table and the targets, write the files."""
    options = build_parser().parse_args(list(argv))
    if options.from_json:
        return report_from_json(Path(options.from_json), None if options.output is None else Path(options.output),
                                plots=not options.no_plots)
    set_threads(options.threads)
    settings = settings_from_arguments(options)
    retained = options.malloc == "retain" and settings.device.type == "cpu" and retain_freed_memory()
    started = time.perf_counter()
    document = run_attention_benchmark(settings)
    document["settings"]["malloc"] = "retain freed memory (mallopt)" if retained else "default"
    document["command"] = " ".join(["lattn", "bench", "attention", *argv])
    document["seconds"] = round(time.perf_counter() - started, 1)
    rows = [report.format_row(record, TABLE_COLUMNS) for record in document["results"]]
    print(report.format_table([name for name, _, _ in TABLE_COLUMNS], rows))
    print()
    print(report.format_targets(document["targets"]))
    written = report.write_outputs(document, Path(options.output or "bench_results/attention"), "attention",
                                   TABLE_COLUMNS, plots=not options.no_plots)
    print(f"\n{len(document['results'])} points in {document['seconds']:.0f} s; written: "
          + ", ".join(str(path) for path in written))
    return document


def report_from_json(path: Path, output: Path | None, plots: bool = True) -> dict[str, Any]:
    """`--from-json`: the targets evaluated again on a saved run's results; its outputs written again."""
    import json

    document = json.loads(path.read_text())
    if document.get("benchmark") != "attention":
        raise ValueError(f"{path} is not the JSON of `lattn bench attention`")
    document["targets"] = evaluate_targets(document["results"])
    print(report.format_targets(document["targets"]))
    written = report.write_outputs(document, output or path.parent, "attention", TABLE_COLUMNS, plots=plots)
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return document
