"""Running `lattn bench attention`: every point of the settings, measured one after the other.

Each *case* is measured at each token count N (on an H x W grid), dtype and mode (forward, or
forward+backward) as one *point*: median time with its spread, peak extra memory, FLOPs, the output's
error against the exact attention it stands for, and the distance to the machine's roofline. A point
that runs out of memory, fails, or is predicted to be too slow is a result too (its status and note).
The results document holds every point's record and the targets checked on them (:mod:`.targets`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .cases import Case
from .measure import (
    DTYPES,
    LOST_EVENTS_NOTE,
    Roofline,
    call_with_peak_memory,
    counting_flops,
    machine_description,
    measure_roofline,
    paired_ratio,
    run_capped,
    time_calls,
    time_side_by_side,
)
from .reference import REFERENCES
from .settings import AttentionBenchSettings
from .targets import evaluate_targets, memory_is_trusted
from .workloads import Workload

ROOFLINE_REPROBE_SECONDS = 60.0
# Rounds a pair gets while its budget (--point-seconds) lasts: the target is passed or failed on the
# median of the rounds' ratios, and on the 6 to 7 rounds that 1 s bought at N=1024 forward+backward
# (about 90 ms a call) that median moved by up to 8% between runs of the same pair.
PAIR_ROUNDS = 15


def point_record(case: Case, hw: tuple[int, int], dtype: str, mode: str, settings: AttentionBenchSettings,
                 **values: Any) -> dict[str, Any]:
    """One point's record with every field of the JSON and CSV, in their order; `values` fill some in."""
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
    started = time.perf_counter()
    # Every memory reading starts without gradients, so the peak includes the ones the backward pass writes.
    out, peak = call_with_peak_memory(lambda: workload.call(mode), device,
                                      at_least=workload.output_and_gradient_bytes,
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
        record = point_record(case, hw, dtype, mode, settings)
        skip = self.skip_reason(key, n)
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

    def skip_reason(self, key: tuple[str, str, str], n: int) -> tuple[str, str] | None:
        """(status, note) of a point not worth running: its case ran out of memory at a smaller N, or the
        previous N's time predicts a call longer than --max-call-seconds; None to run it."""
        if key in self.out_of_memory_at and n > self.out_of_memory_at[key]:
            return "oom", f"not run: out of memory already at N={self.out_of_memory_at[key]}"
        if key in self.last_time:
            previous_n, previous_seconds = self.last_time[key]
            predicted = previous_seconds * (n / previous_n) ** 2  # quadratic: safe for every mechanism
            if predicted > self.settings.max_call_seconds:
                return "skipped", (f"not run: ~{predicted:.0f} s per call predicted from N={previous_n} "
                                   f"(> --max-call-seconds {self.settings.max_call_seconds:g})")
        return None

    def guarded(self, action: Callable[[], None], record: dict[str, Any],
                out_of_memory_key: tuple[str, str, str] | None = None) -> bool:
        """Run `action` under the memory cap. Out of memory, or any other failure, is written into
        `record` as its status and note instead of stopping the sweep; returns whether it succeeded.
        Running out of memory at `out_of_memory_key` skips that case's larger N."""
        limit = self.settings.memory_limit_bytes
        _, failure = run_capped(action, limit, self.device)
        if failure is None:
            return True
        if failure["status"] == "oom":
            if out_of_memory_key is not None:
                self.out_of_memory_at[out_of_memory_key] = int(record["n"])
            if limit:
                failure["note"] += f" (limit {limit / 2**30:.1f} GiB)"
        record.update(failure)
        return False


def run_attention_benchmark(settings: AttentionBenchSettings, progress: bool = True) -> dict[str, Any]:
    """Measure every point of `settings`; returns the results document with the targets checked on it."""
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
